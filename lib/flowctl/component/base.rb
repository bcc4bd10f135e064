# frozen_string_literal: true

require "logger"

module Flowctl
  module Component
    # What Source, Processor and Consumer share: the class DSL and the instance's view of its
    # run (id, config, metrics, logger, status).
    #
    #   class Square < Flowctl::Component::Processor
    #     info name: "square", version: "1.0.0", input_event_types: ["raw"], output_event_types: ["squared"]
    #     config :factor, Integer, default: 1        # FACTOR in the environment
    #     def process(event) = ...
    #   end
    #   Square.run(port: 50051)
    class Base
      INFO_KEYS = %i[name version description input_event_types output_event_types metadata max_concurrent].freeze

      class << self
        # call-seq: info name:, version:, description: "", input_event_types: [], output_event_types: [],
        #                metadata: {}, max_concurrent: nil
        def info(name:, version: "0.0.0", description: "", input_event_types: [], output_event_types: [],
                 metadata: {}, max_concurrent: nil)
          @component_info = {
            name: nonempty_string(:name, name), version: nonempty_string(:version, version),
            description: String(description).dup.freeze,
            input_event_types: string_list(:input_event_types, input_event_types),
            output_event_types: string_list(:output_event_types, output_event_types),
            metadata: metadata.to_h { |k, v| [k.to_s.freeze, v.to_s.freeze] }.freeze,
            max_concurrent: max_concurrent
          }.freeze
        end

        # The info of this class (or of the nearest ancestor that declared one); a class that
        # declared none is named after itself.
        def component_info
          return @component_info if @component_info
          return superclass.component_info if superclass.respond_to?(:component_info) && superclass.instance_variable_get(:@component_info)

          default = (name || "component").split("::").last.gsub(/([a-z\d])([A-Z])/, '\1-\2').downcase
          { name: default, version: "0.0.0", description: "", input_event_types: [].freeze, output_event_types: [].freeze,
            metadata: {}.freeze, max_concurrent: nil }.freeze
        end

        # call-seq: config :name, Type = String, default: nil, required: false, env: "NAME",
        #                  min: nil, max: nil, allowed: nil, description: ""
        #
        # Type: String, Integer, Float, :boolean, :duration (seconds) or Array. Every key but
        # an Array one is also live: the control plane can change it while the component runs
        # (LiveConfig, #on_config).
        def config(name, type = String, **opts)
          field = ConfigField.new(name, type, **opts)
          (@config_fields ||= {})[field.name] = field
          field.name
        end

        def config_fields
          inherited = superclass.respond_to?(:config_fields) ? superclass.config_fields : {}
          inherited.merge(@config_fields || {})
        end

        # call-seq: Klass.run(**overrides) -> nil
        #
        # Serves the component until SIGTERM or SIGINT, then shuts down cleanly (see Runtime).
        # The keywords override the environment (Settings lists them).
        def run(**opts)
          runtime = start(**opts)
          runtime.wait_for_signal
          nil
        end

        # call-seq: Klass.start(logger: nil, **overrides) -> Flowctl::Component::Runtime
        #
        # Starts the component in the background (no signal handling): #port, #health_port,
        # #stop. For tests and for programs that run a component among other things.
        # logger: where the component logs (default: $stderr, level FLOWCTL_LOG_LEVEL or INFO).
        def start(logger: nil, **opts)
          raise NotImplementedError, "#{self} must be a subclass of Source, Processor or Consumer" unless respond_to?(:kind)

          settings = Settings.resolve(self, **opts)
          Runtime.new(new, settings, logger: logger).start
        end

        private

        def nonempty_string(key, v)
          raise TypeError, "info #{key}: must be a String (given #{v.class})" unless v.is_a?(String) || v.is_a?(Symbol)
          raise ArgumentError, "info #{key}: must not be empty" if v.to_s.empty?

          v.to_s.dup.freeze
        end

        def string_list(key, list)
          Array(list).map do |t|
            raise TypeError, "info #{key}: must be Strings (given #{t.class})" unless t.is_a?(String) || t.is_a?(Symbol)

            t.to_s.dup.freeze
          end.freeze
        end
      end

      # The runtime that serves this component (set before #setup runs).
      attr_reader :runtime

      # Called once, after the settings are known and before anything is served.
      def setup; end

      # Called once at shutdown, after the last event.
      def teardown; end

      # Called with an event whose processing raised (a dead-letter queue, a log, ...); the
      # default does nothing (the failure is logged and counted either way).
      def dead_letter(event, error); end

      # Called with a new configuration pushed by the control plane (live configuration,
      # see LiveConfig): config is the whole Hash #config will return (already checked
      # against the `config` declarations), version its number. Raise to refuse it (the
      # component keeps the configuration it has; the reason is logged and reported in the
      # heartbeat). Runs on its own thread, while events flow. The default accepts it.
      def on_config(config, version); end

      def id = runtime.settings.id

      # The current config: {key => value} of every `config` declaration (the environment
      # at start, then each live version applied).
      def config = runtime.config

      # call-seq: discover(type: nil, event_types: [], metadata: {}) -> [Flowctl::V1::ComponentInfo]
      #
      # Service discovery: the components registered with this component's control plane
      # whose type (:source, :processor, :consumer/:sink; nil: any), event types (any of
      # them among a component's input or output types) and metadata (every pair) match.
      # Flowctl::Error when the component runs standalone.
      def discover(type: nil, event_types: [], metadata: {})
        runtime.discover(type: type, event_types: event_types, metadata: metadata)
      end

      def metrics = runtime.metrics

      def logger = runtime.logger

      # :healthy, :degraded or :unhealthy: what heartbeats, HealthCheck and /health report.
      def status=(status)
        runtime.status = status
      end

      # @api private
      def attach(runtime)
        @runtime = runtime
      end
    end
  end
end
