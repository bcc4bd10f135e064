# frozen_string_literal: true

module Flowctl
  # Clients of the deployed flowctl.v1 protocol (FLOWCTL_V1.md), one per service (the services
  # come from the built-in descriptor set), with the options of every Flowctl::Client
  # (timeout:, tls:, headers:, channel_args:):
  #
  #   cp = Flowctl::V1::ControlPlaneClient.new("127.0.0.1:8080", tls: false)
  #   cp.register_component(component: {id: "p1", type: :COMPONENT_TYPE_PROCESSOR, name: "p"})
  #   source = Flowctl::V1::SourceClient.new(addr, tls: false)
  #   source.stream_events(params: {"from" => "1"}) { |event| ... }               # server streaming
  #   Flowctl::V1::ConsumerClient.new(addr, tls: false).consume(events)           # client streaming
  #   Flowctl::V1::ProcessorClient.new(addr, tls: false).process(events) { |e| }  # bidi
  module V1
    # register_component, unregister_component, heartbeat, discover_components,
    # get_component_status, list_components.
    class ControlPlaneClient < Flowctl::Client
      use_service ControlPlaneService
    end

    # get_info, health_check, stream_events (server streaming), get_state, save_state.
    class SourceClient < Flowctl::Client
      use_service SourceService
    end

    # get_info, health_check, process (bidi).
    class ProcessorClient < Flowctl::Client
      use_service ProcessorService
    end

    # get_info, health_check, consume (client streaming).
    class ConsumerClient < Flowctl::Client
      use_service ConsumerService
    end
  end
end
