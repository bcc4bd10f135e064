# frozen_string_literal: true

require_relative "flowctl/version"
require_relative "flowctl/flowctl"
require_relative "flowctl/messages"
require_relative "flowctl/descriptor"
require_relative "flowctl/json"
require_relative "flowctl/service"
require_relative "flowctl/tls"
require_relative "flowctl/channel_args"
require_relative "flowctl/client"
require_relative "flowctl/v1"
require_relative "flowctl/server"
require_relative "flowctl/health"
require_relative "flowctl/registry"
require_relative "flowctl/heartbeat"
require_relative "flowctl/heartbeat_v1"
require_relative "flowctl/component"

# Obsrvr flow control plane and processor protocol, native on gRPC C core and protobuf-c.
# See README.md for an irb tour.
module Flowctl
end
