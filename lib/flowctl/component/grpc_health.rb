# frozen_string_literal: true

module Flowctl
  module Component
    # grpc.health.v1.Health on the component's gRPC port (what grpc_health_probe, Kubernetes
    # gRPC probes and the grpc gem's health stub ask): SERVING while the component is ready and
    # HEALTHY or DEGRADED, NOT_SERVING otherwise. The service name "" and the component's
    # flowctl.v1 service name ("flowctl.v1.ProcessorService", ...) are known; any other is
    # NOT_FOUND. Watch sends the status at once and again whenever it changes.
    class GrpcHealth
      WATCH_POLL = 0.25

      # The Flowctl::Service of grpc.health.v1.Health, or nil when it is not loaded.
      def self.service
        return nil unless defined?(::Grpc::Health::V1)

        mod = ::Grpc::Health::V1
        %i[HealthService Health Service].each do |name|
          s = mod.const_get(name) if mod.const_defined?(name, false)
          return s if s.is_a?(Flowctl::Service)
        end
        nil
      end

      def initialize(runtime)
        @runtime = runtime
        @names = ["", "flowctl.v1.#{runtime.kind.capitalize}Service"].freeze
      end

      def check(request)
        ::Grpc::Health::V1::HealthCheckResponse.new(status: serving(request.service))
      end

      def watch(request, call)
        last = nil
        @runtime.stream do
          @runtime.interruptible do
            loop do
              now = serving(request.service)
              @runtime.streams_critical { call.write(::Grpc::Health::V1::HealthCheckResponse.new(status: now)) } if now != last
              last = now
              sleep WATCH_POLL
            end
          end
        end
        nil
      end

      private

      def serving(name)
        raise Flowctl::NotFound, "unknown service #{name.inspect} (known: #{@names.inspect})" unless @names.include?(name)

        ok = @runtime.ready? && %w[HEALTHY DEGRADED].include?(@runtime.status)
        ok ? :SERVING : :NOT_SERVING
      end
    end
  end
end
