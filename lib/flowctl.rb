# frozen_string_literal: true

require_relative "flowctl/version"
begin
  require_relative "flowctl/flowctl"
rescue LoadError => e
  raise if Dir[File.join(__dir__, "flowctl", "flowctl.{so,bundle}")].any? # built, but it would not load

  # A checkout used in place (Bundler's `path:` or `git:`, or -Ilib) has no compiled extension
  # until it is built: Bundler builds none for path gems.
  raise LoadError, "flowctl: its C extension (lib/flowctl/flowctl.so) is not built: run `bundle exec rake compile` " \
                   "in #{File.expand_path('..', __dir__)} (needs libgrpc-dev and libprotobuf-c-dev: " \
                   "sudo apt-get install -y build-essential pkg-config ruby-dev libgrpc-dev libprotobuf-c-dev). " \
                   "(#{e.message})"
end
require_relative "flowctl/errors"
require_relative "flowctl/messages"
require_relative "flowctl/descriptor"
require_relative "flowctl/json"
require_relative "flowctl/service"
require_relative "flowctl/tls"
require_relative "flowctl/channel_args"
require_relative "flowctl/interceptors"
require_relative "flowctl/fiber_calls"
require_relative "flowctl/forwarding"
require_relative "flowctl/client"
require_relative "flowctl/v1"
require_relative "flowctl/server"
require_relative "flowctl/health"
require_relative "flowctl/registry"
require_relative "flowctl/heartbeat"
require_relative "flowctl/heartbeat_v1"
require_relative "flowctl/logger"
require_relative "flowctl/component"

# Obsrvr flow control plane and processor protocol, native on gRPC C core and protobuf-c.
# See README.md for an irb tour.
module Flowctl
end
