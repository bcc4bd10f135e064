# frozen_string_literal: true

require "socket"

module Flowctl
  module Component
    # What a component runs with: the environment contract of `flowctl run` (FLOWCTL_V1.md),
    # overridden by the keywords given to `.run`.
    #
    #   ENABLE_FLOWCTL              "true"/"1"/"yes"/"on": register and heartbeat; otherwise standalone
    #   FLOWCTL_ENDPOINT            the control plane, "host:port" (default localhost:8080)
    #   FLOWCTL_HEARTBEAT_INTERVAL  a Go duration ("10s", "500ms", "1m30s"; default 10s)
    #   FLOWCTL_COMPONENT_ID        the component id (then FLOWCTL_SERVICE_ID, then the info name)
    #   PORT                        the gRPC port (default: a free port)
    #   HEALTH_PORT                 the HTTP health port (default: no health server)
    #   <CONFIG KEY>                each declared config key in UPPER_SNAKE
    #   FLOWCTL_FAILED_EVENTS       "drop" or "reply": what a processor does with an event whose
    #                               #process raised (default "reply" under flowctl-pipeline, which
    #                               sets FLOWCTL_INPUTS; else "drop"); this gem's extension
    #
    # Keywords: id:, control_plane: ("host:port", or false for standalone), heartbeat_interval:,
    # host:, port:, endpoint: (what the control plane is told to dial), health_port: (false: none),
    # health_host:, config: {key: value}, max_concurrent:, grace: (seconds to drain at shutdown),
    # protocols: ([:v1], [:seed] or [:v1, :seed]), live_config: (false: no live configuration
    # from the control plane; see LiveConfig), failed_events: (:drop or :reply, see
    # Processor; FLOWCTL_FAILED_EVENTS), env: (a Hash in place of ENV).
    Settings = Struct.new(:id, :enabled, :control_plane, :heartbeat_interval, :host, :port, :endpoint,
                          :health_host, :health_port, :config, :max_concurrent, :grace, :protocols,
                          :live_config, :failed_events, keyword_init: true) do
      def standalone? = !enabled
    end

    class Settings
      KEYWORDS = %i[id control_plane heartbeat_interval host port endpoint health_host health_port config
                    max_concurrent grace protocols live_config failed_events env].freeze
      FAILED_EVENTS = %i[drop reply].freeze
      PROTOCOLS = %i[v1 seed].freeze
      ENABLED = %w[1 true yes on].freeze
      DEFAULT_GRACE = 10.0

      # call-seq: Settings.resolve(component_class, **overrides) -> Settings (frozen)
      def self.resolve(klass, **opts)
        unknown = opts.keys - KEYWORDS
        raise ArgumentError, "unknown keyword(s) #{unknown.map(&:inspect).join(', ')} (known: #{KEYWORDS.join(', ')})" unless unknown.empty?

        Resolver.new(klass, opts).settings.freeze
      end

      # Reads one setting at a time; keeps .resolve short.
      class Resolver
        def initialize(klass, opts)
          @klass = klass
          @opts = opts
          @env = opts.fetch(:env, ENV)
          raise TypeError, "env: must be a Hash of String => String (given #{@env.class})" unless @env.respond_to?(:[])
        end

        def settings
          host = string(:host, nil) || "127.0.0.1"
          Settings.new(id: id, enabled: enabled?, control_plane: control_plane, heartbeat_interval: interval,
                       host: host, port: port(:port, "PORT") || 0, endpoint: string(:endpoint, nil),
                       health_host: string(:health_host, nil) || host, health_port: health_port,
                       config: config, max_concurrent: max_concurrent, grace: grace, protocols: protocols,
                       live_config: @opts.fetch(:live_config, true) ? true : false, failed_events: failed_events)
        end

        private

        def env(name)
          v = @env[name]
          v.nil? || v.strip.empty? ? nil : v.strip
        end

        def string(key, env_name)
          v = @opts.key?(key) ? @opts[key] : (env_name && env(env_name))
          return nil if v.nil?
          raise TypeError, "#{key}: must be a String (given #{v.class})" unless v.is_a?(String) || v.is_a?(Symbol)
          raise ArgumentError, "#{key}: must not be empty" if v.to_s.empty?

          v.to_s.dup.freeze
        end

        def id
          string(:id, nil) || env("FLOWCTL_COMPONENT_ID") || env("FLOWCTL_SERVICE_ID") || @klass.component_info.fetch(:name).dup.freeze
        end

        def enabled?
          return @opts[:control_plane] ? true : false if @opts.key?(:control_plane)

          ENABLED.include?(env("ENABLE_FLOWCTL").to_s.downcase)
        end

        def control_plane
          cp = @opts[:control_plane]
          return nil if cp == false
          return string(:control_plane, nil) unless cp.nil?

          env("FLOWCTL_ENDPOINT") || "localhost:8080"
        end

        def interval
          if @opts.key?(:heartbeat_interval)
            Duration.parse(@opts[:heartbeat_interval], name: "heartbeat_interval")
          else
            Duration.parse(env("FLOWCTL_HEARTBEAT_INTERVAL") || "10s", name: "FLOWCTL_HEARTBEAT_INTERVAL")
          end
        end

        def port(key, env_name)
          v = @opts.key?(key) ? @opts[key] : env(env_name)
          return nil if v.nil? || v == false

          n = v.is_a?(Integer) ? v : Integer(v.to_s, 10, exception: false)
          label = @opts.key?(key) ? "#{key}:" : env_name
          raise ArgumentError, "#{label}: #{v.inspect} is not a port number (0..65535)" unless n && n.between?(0, 65_535)

          n
        end

        def health_port = port(:health_port, "HEALTH_PORT")

        def config
          explicit = @opts.fetch(:config, {})
          raise TypeError, "config: must be a Hash (given #{explicit.class})" unless explicit.is_a?(Hash)

          explicit = explicit.transform_keys(&:to_sym)
          fields = @klass.config_fields
          unknown = explicit.keys - fields.keys
          raise ArgumentError, "config: unknown key(s) #{unknown.join(', ')} (declared: #{fields.keys.join(', ')})" unless unknown.empty?

          fields.transform_values { |f| f.resolve(explicit, @env) }.freeze
        end

        def max_concurrent
          v = @opts.fetch(:max_concurrent) { @klass.component_info[:max_concurrent] }
          return nil if v.nil?
          raise ArgumentError, "max_concurrent: must be a positive Integer (given #{v.inspect})" unless v.is_a?(Integer) && v.positive?

          v
        end

        def grace
          v = @opts.fetch(:grace, DEFAULT_GRACE)
          raise ArgumentError, "grace: must be a number of seconds >= 0 (given #{v.inspect})" unless v.is_a?(Numeric) && v >= 0

          v.to_f
        end

        # :reply when FLOWCTL_FAILED_EVENTS says so or flowctl-pipeline runs the component (it
        # sets FLOWCTL_INPUTS, and its router routes marked events to the dead-letter sink);
        # :drop otherwise (flowctl run would hand a marked event to the sinks as any other).
        def failed_events
          v = @opts.fetch(:failed_events) { env("FLOWCTL_FAILED_EVENTS") || (@env["FLOWCTL_INPUTS"] ? "reply" : "drop") }
          sym = v.to_s.downcase.to_sym
          label = @opts.key?(:failed_events) ? "failed_events:" : "FLOWCTL_FAILED_EVENTS"
          raise ArgumentError, "#{label} #{v.inspect} must be one of #{FAILED_EVENTS.join(', ')}" unless FAILED_EVENTS.include?(sym)

          sym
        end

        def protocols
          v = Array(@opts.fetch(:protocols, [:v1])).map { |p| p.to_s.to_sym }
          bad = v - PROTOCOLS
          raise ArgumentError, "protocols: unknown #{bad.inspect} (known: #{PROTOCOLS.inspect})" unless bad.empty?
          raise ArgumentError, "protocols: give at least one of #{PROTOCOLS.inspect}" if v.empty?

          v.uniq.freeze
        end
      end
    end
  end
end
