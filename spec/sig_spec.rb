# frozen_string_literal: true

require "spec_helper"
require "open3"
require "tmpdir"

# sig/: the RBS of the public API (hand-written, sig/flowctl.rbs) and of every built-in message
# class (sig/messages.rbs, written by `rake sig` from lib/flowctl/protocols.pb).
RSpec.describe "RBS signatures" do
  root = File.expand_path("..", __dir__)

  it "sig/messages.rbs is what `rake sig` writes from the descriptor set now" do
    require_relative "../tasks/sig"
    Dir.mktmpdir do |dir|
      FlowctlSig.write(File.join(dir, "messages.rbs"))
      expect(File.read(File.join(dir, "messages.rbs"))).to eq(File.read(File.join(root, "sig", "messages.rbs")))
    end
  end

  it "names every message class and enum module of the built-in packages" do
    sig = File.read(File.join(root, "sig", "messages.rbs"))
    expect(sig).to include("class Event < Flowctl::Message", "module HealthStatus", "attr_accessor timestamp: Time?")
  end

  it "validates with rbs (when the rbs gem is installed)" do
    rbs = Gem.bin_path("rbs", "rbs")
    out, status = Open3.capture2e(RbConfig.ruby, rbs, "-r", "logger", "-I", File.join(root, "sig"), "validate")
    expect(status).to be_success, out
  rescue Gem::Exception
    skip "rbs is not installed (gem install rbs)"
  end
end
