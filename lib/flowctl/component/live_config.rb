# frozen_string_literal: true

module Flowctl
  module Component
    # Live configuration of a running component, over the gem's extension
    # flowctl.ext.v1.ConfigService (Flowctl::Config; plain flowctl.v1 control planes answer
    # UNIMPLEMENTED and the component goes on with its environment alone).
    #
    # The component's `config` declarations are its schema (types, required, min/max,
    # allowed; Array keys are not live). Once the component is registered it declares that
    # schema, with the values it runs with as defaults (so that version 1 in the control
    # plane is what it already does), and watches its configuration. Each new version is
    # checked against the declarations, handed to the component's #on_config(config, version)
    # and, when that returns, becomes #config and is acknowledged: metrics "config_version"
    # in the next heartbeat. A version that does not fit, or whose on_config raised, is
    # refused: the component keeps its configuration, logs the reason, and its heartbeat
    # carries "config_refused_version" and "config_error" (the reason) until a later version
    # is applied; the same version is never tried again.
    class LiveConfig
      # Whether the component takes live configuration: it runs with a control plane, did
      # not opt out (live_config: false) and declares at least one live key.
      def self.wanted?(runtime)
        runtime.settings.enabled && runtime.settings.live_config && fields(runtime.component.class).any?
      end

      def self.fields(klass) = klass.config_fields.select { |_, f| f.live? }

      def initialize(runtime)
        @runtime = runtime
        @fields = LiveConfig.fields(runtime.component.class)
      end

      def start
        require_relative "../config/service" # not ../config: its require "flowctl" may find another copy
        require_relative "../config/watcher"
        @runtime.metrics.config_version = 0
        @watcher = Flowctl::Config::Watcher.start(
          endpoint: @runtime.settings.control_plane, component_id: @runtime.settings.id, schema: method(:schema),
          on_config: method(:apply), on_applied: method(:applied), on_refused: method(:refused),
          on_error: method(:error), client: { tls: Heartbeat.loopback?(@runtime.settings.control_plane) ? false : nil }
        )
        self
      end

      def stop = @watcher&.stop

      # The Flowctl::Config::Watcher (nil until started).
      attr_reader :watcher

      # The version applied last (0: none).
      def version = @watcher ? @watcher.version : 0

      # The schema the control plane is told, defaults = the values the component runs with.
      def schema
        current = @runtime.config
        Flowctl::Config::Schema.new(@fields.to_h { |name, f| [name.to_s, f.schema_entry(current[name])] })
      end

      # One version (values as JSON decoded them, String keys): checked, handed to
      # on_config, then made current. Raises (Flowctl::InvalidArgument naming the key) to refuse.
      def apply(values, version)
        config = merge(values)
        hook = @runtime.component.method(:on_config)
        hook.arity == 1 ? hook.call(config) : hook.call(config, version)
        @runtime.config = config
      end

      private

      # The current config with the version's values of every live key (a key the version
      # leaves out gets its declared default).
      def merge(values)
        unknown = values.keys.map(&:to_s) - @fields.keys.map(&:to_s)
        raise InvalidArgument, "config key #{unknown.first.inspect} is not declared by #{@runtime.settings.id}" unless unknown.empty?

        out = @runtime.config.dup
        @fields.each do |name, f|
          given = values.key?(name.to_s)
          raise InvalidArgument, "config key #{name.to_s.inspect} is required" if !given && f.required?

          out[name] = given ? f.coerce(values[name.to_s]) : f.default
        rescue ArgumentError => e
          raise InvalidArgument, e.message
        end
        out.freeze
      end

      def applied(version)
        @runtime.metrics.config_version = version
        @runtime.logger.info("config version #{version} applied")
        @runtime.registration&.push
      end

      def refused(version, error)
        reason = error.is_a?(Flowctl::RPCError) ? error.details : "#{error.class}: #{error.message}"
        @runtime.metrics.config_refused(version, reason)
        @runtime.logger.warn("config version #{version} refused: #{reason}")
        @runtime.registration&.push
      end

      def error(error)
        @runtime.logger.debug("config watch #{@runtime.settings.control_plane}: #{error.class}: #{error.message}")
      end
    end
  end
end
