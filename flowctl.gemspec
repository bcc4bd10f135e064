# frozen_string_literal: true

require_relative "lib/flowctl/version"

Gem::Specification.new do |s|
  s.name = "flowctl"
  s.version = Flowctl::VERSION
  s.summary = "Obsrvr flow control plane and processor protocol for Ruby, native on gRPC C core and protobuf-c"
  s.description = "Register processors, sources and consumers with an Obsrvr flow control plane, send " \
                  "heartbeats from a native thread, and stream data through processors over gRPC. " \
                  "A C extension on gRPC C core and protobuf-c; Ruby only for the surface."
  s.authors = ["flowctl developers"]
  s.license = "Apache-2.0"
  s.homepage = "https://github.com/withObsrvr/flowctl-ruby"
  s.required_ruby_version = ">= 3.0"
  s.metadata = {
    "source_code_uri" => s.homepage,
    "changelog_uri" => "#{s.homepage}/blob/main/CHANGELOG.md",
    "bug_tracker_uri" => "#{s.homepage}/issues",
    "documentation_uri" => "#{s.homepage}#readme",
    "rubygems_mfa_required" => "true"
  }
  # lib/flowctl/protocols.pb: the descriptor set the built-in message classes are made from
  s.files = Dir["lib/**/*.{rb,pb}", "ext/**/*.{c,h,rb}", "proto/**/*.proto", "proto/**/README.md", "sig/**/*.rbs",
                "exe/*", "README.md", "CHANGELOG.md", "LICENSE"]
  s.bindir = "exe"
  s.executables = ["flowctl-controlplane", "flowctl-pipeline"]
  s.extensions = ["ext/flowctl/extconf.rb"]
  s.require_paths = ["lib"]
end
