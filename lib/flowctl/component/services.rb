# frozen_string_literal: true

module Flowctl
  module Component
    # The gRPC side of a component: which services it serves, and what every flowctl.v1
    # component service shares (GetInfo, HealthCheck). The kind-specific handlers
    # (Processor::Handler, Source::Handler, Consumer::Handler) include Services::Common.
    module Services
      module_function

      # Mounts the component's services on server: its flowctl.v1 service (protocols include
      # :v1), the seed's ProcessorService (a processor with protocols including :seed), a
      # processor's outputs as a SourceService under FLOWCTL_WIRING=discovery (SelfWiring), and
      # grpc.health.v1 (the runtime's Flowctl::Health).
      def mount(server, runtime)
        klass = runtime.component.class
        if runtime.settings.protocols.include?(:v1)
          server.handle(Flowctl::V1.const_get(:"#{klass.kind.capitalize}Service"), klass::Handler.new(runtime))
        end
        if runtime.settings.protocols.include?(:seed)
          raise ArgumentError, "the seed protocol has no #{klass.kind} service; use protocols: [:v1]" unless klass.kind == :processor

          server.handle(Flowctl::Processor::Service, SeedProcessor.new(runtime))
        end
        if klass.kind == :processor && (env = SelfWiring.env(runtime.settings))
          server.handle(Flowctl::V1::SourceService, Processor::SourceHandler.new(runtime, env))
        end
        server.handle(Flowctl::Health::SERVICE, runtime.grpc_health)
      end

      # A component's method returned a Hash or an Event; anything else is a mistake that
      # fails the event (TypeError names what was returned).
      def event(value, default_source = nil)
        case value
        when Flowctl::V1::Event then value
        when Hash
          fields = value.transform_keys(&:to_sym)
          fields[:source_component_id] ||= default_source if default_source
          Flowctl::V1::Event.new(**fields)
        else
          raise TypeError, "expected a Flowctl::V1::Event or a Hash of its fields (got #{value.class})"
        end
      end

      # nil, one event or an Array of them -> Array of Events.
      def events(value)
        case value
        when nil then []
        when Array then value.map { |v| event(v) }
        else [event(value)]
        end
      end

      # GetInfo and HealthCheck of every flowctl.v1 component service.
      module Common
        def initialize(runtime)
          @runtime = runtime
          @component = runtime.component
        end

        def get_info(_request)
          Flowctl::V1::ComponentInfo.new(**@runtime.info)
        end

        def health_check(request)
          status = :"HEALTH_STATUS_#{@runtime.status}"
          details = if request.include_details
                      [Flowctl::V1::ComponentHealth.new(component_name: @runtime.settings.id, status: status,
                                                        message: detail_message)]
                    else
                      []
                    end
          Flowctl::V1::HealthCheckResponse.new(status: status, metrics: @runtime.metrics.to_heartbeat,
                                               components: details, message: detail_message)
        end

        private

        def detail_message
          reg = @runtime.registration
          if reg.nil? then "standalone"
          elsif reg.registered? then "registered with #{@runtime.settings.control_plane}"
          else "not yet registered with #{@runtime.settings.control_plane}"
          end
        end
      end
    end
  end
end
