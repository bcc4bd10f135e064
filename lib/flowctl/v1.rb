# frozen_string_literal: true

# Nothing to do until the descriptor loader has made the flowctl.v1 package.
return unless defined?(Flowctl::V1)

module Flowctl
  # Clients of the deployed flowctl.v1 protocol (FLOWCTL_V1.md), one per service, with the
  # options of every Flowctl::Client (timeout:, tls:, headers:, channel_args:):
  #
  #   cp = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:8080", tls: false)
  #   cp.register_component(component: {id: "p1", ...})
  #   source = Flowctl::V1::SourceClient.new(addr, tls: false)
  #   source.stream_events(params: {"from" => "1"}) { |event| ... }      # server streaming
  #   Flowctl::V1::ConsumerClient.new(addr, tls: false).consume(events)  # client streaming
  #   Flowctl::V1::ProcessorClient.new(addr, tls: false).process(events) { |event| ... }  # bidi
  #
  # Each is defined once its service is (Flowctl::V1::ControlPlaneService, ..., made by the
  # descriptor loader); until then this file defines nothing.
  module V1
    # RegisterComponent, UnregisterComponent, Heartbeat, DiscoverComponents, GetComponentStatus,
    # ListComponents.
    if const_defined?(:ControlPlaneService, false)
      class ControlPlaneClient < Flowctl::Client
        use_service ControlPlaneService
      end
    end

    # GetInfo, HealthCheck, StreamEvents (server streaming), GetState, SaveState.
    if const_defined?(:SourceService, false)
      class SourceClient < Flowctl::Client
        use_service SourceService
      end
    end

    # GetInfo, HealthCheck, Process (bidi).
    if const_defined?(:ProcessorService, false)
      class ProcessorClient < Flowctl::Client
        use_service ProcessorService
      end
    end

    # GetInfo, HealthCheck, Consume (client streaming).
    if const_defined?(:ConsumerService, false)
      class ConsumerClient < Flowctl::Client
        use_service ConsumerService
      end
    end
  end
end
