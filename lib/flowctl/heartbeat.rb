# frozen_string_literal: true

require "socket"

module Flowctl
  # Registration and heartbeats to the control plane from a native thread that never
  # holds the GVL (ext/flowctl/heartbeat.c). Start one from a control-plane client:
  #
  #   client = Flowctl::ControlPlane::Client.new("127.0.0.1:8080", tls: false)
  #   hb = client.start_heartbeat(:processor, id: "ttp-1", interval: 10,
  #                               register: {endpoint: "127.0.0.1:9090", metadata: {"v" => "1"}},
  #                               metrics: {"events" => 0})
  #   hb.metrics = {"events" => 42}   # any Ruby thread; the next beat sends it
  #   hb.status = :UNHEALTHY
  #   hb.stats  # => {sent: 12, failed: 0, consecutive_failures: 0, last_error: nil, ...}
  #   hb.stop   # final STOPPING beat, then the thread ends
  #
  # The thread registers first when register: is given, beats at once, then every
  # interval seconds. Failures are retried with exponential backoff and jitter (capped at
  # the interval) and counted in #stats; a control plane that answers success: false
  # (it forgot the component) gets it registered again. Nothing is raised into the
  # program: pass on_error: ->(error) { ... } to hear about failures on a Ruby thread.
  class Heartbeat
    KINDS = %i[processor source consumer].freeze
    STATUSES = statuses # HealthStatus names, from the enum descriptor

    # What FLOWCTL_HEARTBEAT_INTERVAL accepts: "500ms", "10s", "1m", "1h", or seconds ("2.5").
    DURATION = /\A\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*\z/.freeze
    UNITS = {"ms" => 0.001, "s" => 1, "m" => 60, "h" => 3600, nil => 1}.freeze

    attr_reader :kind, :id, :interval, :timeout

    # Use Client#start_heartbeat; this is the same with the channel given explicitly
    # (a Flowctl::Native::Channel).
    def initialize(channel, kind, id:, interval:, status: "HEALTHY", metrics: {}, register: nil, headers: {},
                   timeout: nil, on_error: nil)
      @kind = Heartbeat.check_kind(kind)
      @id = Heartbeat.check_id(id)
      @interval = Heartbeat.check_interval(interval)
      @timeout = timeout.nil? ? @interval.clamp(1.0, 5.0) : Heartbeat.check_seconds(:timeout, timeout)
      if !on_error.nil? && !on_error.respond_to?(:call)
        raise TypeError, "on_error must respond to #call (given #{on_error.class})"
      end

      start_native(channel, @kind, @id, @interval, Heartbeat.check_status(status), metrics,
                   Heartbeat.register_args(register), headers || {}, @timeout, !on_error.nil?)
      @error_thread = on_error && start_error_thread(on_error)
    end

    # Stops the thread: a final beat with status STOPPING (bounded by timeout seconds),
    # then joins. Calling it again does nothing. Returns true; false in the rare case
    # where the thread did not finish within timeout + 2 seconds (it is then left to end
    # on its own).
    def stop(timeout = 1.0)
      timeout = Heartbeat.check_seconds(:timeout, timeout, allow_zero: true)
      joined = native_stop(timeout)
      @error_thread.join(timeout + 1) if @error_thread && @error_thread != Thread.current
      joined
    end

    def status=(status)
      native_set_status(Heartbeat.check_status(status))
    end

    def inspect
      "#<Flowctl::Heartbeat #{kind} #{id.inspect} every #{interval}s #{running? ? 'running' : 'stopped'}>"
    end

    class << self
      # Starts a heartbeat from the environment (the flowctl SDK's variables):
      #   ENABLE_FLOWCTL              "true"/"1" to enable; otherwise returns nil
      #   FLOWCTL_ENDPOINT            control plane address (default "localhost:8080")
      #   FLOWCTL_COMPONENT_ID        the component id (default "<kind>-<hostname>-<pid>")
      #   FLOWCTL_HEARTBEAT_INTERVAL  "10s", "500ms", "1m" or seconds (default 10s)
      # Other keywords go to start_heartbeat (register:, metrics:, status:, on_error:, ...);
      # client: keywords (tls:, headers:, channel_args:) go to the client. Without tls:,
      # a loopback endpoint (localhost, 127.0.0.1, [::1]) is reached in plaintext and any
      # other one with TLS (the client's default).
      def from_env(kind = :processor, env: ENV, client: {}, **opts)
        config = config_from_env(env, kind: kind)
        return nil unless config

        client = {tls: false}.merge(client) if loopback?(config[:endpoint])
        cp = ControlPlane::Client.new(config[:endpoint], **client)
        cp.start_heartbeat(kind, id: config[:id], interval: config[:interval], **opts)
      end

      # @api private
      def loopback?(endpoint)
        host = endpoint.sub(/\A(dns|ipv4|ipv6):(\/\/\/?)?/, "").sub(/:\d+\z/, "").delete("[]")
        %w[localhost 127.0.0.1 ::1].include?(host)
      end

      # The settings from_env would use, or nil when ENABLE_FLOWCTL is not set to true.
      # Bad values raise ArgumentError naming the variable.
      def config_from_env(env = ENV, kind: :processor)
        check_kind(kind)
        return nil unless enabled?(env["ENABLE_FLOWCTL"])

        interval = env.fetch("FLOWCTL_HEARTBEAT_INTERVAL", "10s")
        {
          endpoint: nonempty(env, "FLOWCTL_ENDPOINT") || "localhost:8080",
          id: nonempty(env, "FLOWCTL_COMPONENT_ID") || "#{kind}-#{Socket.gethostname}-#{Process.pid}",
          interval: parse_interval(interval, name: "FLOWCTL_HEARTBEAT_INTERVAL")
        }
      end

      # "10s" -> 10.0, "500ms" -> 0.5, "1m" -> 60.0, "2.5" -> 2.5, 3 -> 3.0
      def parse_interval(value, name: "interval")
        return check_interval(value) if value.is_a?(Numeric)

        m = DURATION.match(value.to_s)
        unless m
          raise ArgumentError, "#{name}: #{value.inspect} is not a duration (use e.g. \"10s\", \"500ms\", \"1m\" or seconds)"
        end

        seconds = Float(m[1]) * UNITS.fetch(m[2])
        raise ArgumentError, "#{name}: #{value.inspect} must be more than zero" unless seconds.positive?
        raise ArgumentError, "#{name}: #{value.inspect} is longer than a day" if seconds > 86_400

        seconds
      end

      # @api private
      def check_kind(kind)
        k = kind.is_a?(String) ? kind.to_sym : kind
        return k if KINDS.include?(k)

        raise ArgumentError, "unknown heartbeat kind #{kind.inspect} (expected :processor, :source or :consumer)"
      end

      # @api private
      def check_id(id)
        id = id.to_s if id.is_a?(Symbol)
        raise TypeError, "id must be a String (given #{id.class})" unless id.is_a?(String)
        raise ArgumentError, "id must not be empty" if id.empty?

        id.dup.freeze
      end

      # @api private
      def check_interval(value)
        value = parse_interval(value) if value.is_a?(String)
        seconds = check_seconds(:interval, value)
        raise ArgumentError, "interval: #{value.inspect} is longer than a day" if seconds > 86_400

        seconds
      end

      # @api private
      def check_seconds(name, value, allow_zero: false)
        raise TypeError, "#{name} must be a number of seconds (given #{value.class})" unless value.is_a?(Numeric)

        f = value.to_f
        ok = allow_zero ? f >= 0 : f.positive?
        raise ArgumentError, "#{name} must be #{allow_zero ? '>= 0' : '> 0'} seconds (given #{value.inspect})" unless ok && f.finite?

        f
      end

      # @api private
      def check_status(status)
        unless status.is_a?(String) || status.is_a?(Symbol)
          raise ArgumentError, "status must be a HealthStatus name, one of #{STATUSES.join(', ')} (given #{status.inspect})"
        end

        name = status.to_s.upcase
        return name if STATUSES.include?(name)

        raise ArgumentError, "unknown status #{status.inspect} (expected one of #{STATUSES.join(', ')})"
      end

      # @api private: register: {endpoint:, metadata:} (or true) -> [endpoint, metadata]
      def register_args(register)
        case register
        when nil, false then nil
        when true then ["", {}]
        when Hash
          unknown = register.keys - %i[endpoint metadata]
          raise ArgumentError, "register: unknown keys #{unknown.inspect} (endpoint:, metadata:)" unless unknown.empty?

          metadata = register.fetch(:metadata, {}) || {}
          raise TypeError, "register: metadata must be a Hash (given #{metadata.class})" unless metadata.is_a?(Hash)

          [register.fetch(:endpoint, "").to_s, metadata]
        else
          raise TypeError, "register: must be a Hash {endpoint:, metadata:}, true or nil (given #{register.class})"
        end
      end

      private

      def enabled?(value)
        %w[1 true yes on].include?(value.to_s.strip.downcase)
      end

      def nonempty(env, name)
        v = env[name]
        v.nil? || v.strip.empty? ? nil : v.strip
      end
    end

    private

    # The on_error: callback runs here, on a Ruby thread; the native thread only queues.
    def start_error_thread(callback)
      Thread.new do
        Thread.current.name = "flowctl-heartbeat-errors"
        Thread.current.report_on_exception = false
        while (error = next_error)
          begin
            callback.call(error)
          rescue StandardError => e
            warn "flowctl: heartbeat on_error callback raised #{e.class}: #{e.message}"
          end
        end
      end
    end
  end

  class Heartbeat
    # Client#start_heartbeat, included into Flowctl::ControlPlane::Client.
    module Starter
      # client.start_heartbeat(:processor, id:, interval:, status: "HEALTHY", metrics: {},
      #                        register: nil, on_error: nil, headers: nil, timeout: nil) -> Flowctl::Heartbeat
      #
      # Beats on this client's channel with its headers (plus headers:). register:
      # {endpoint:, metadata:} registers first (and again whenever the control plane
      # forgot the component). timeout: deadline of each call (default: the interval,
      # at least 1 and at most 5 seconds).
      def start_heartbeat(kind, id:, interval:, status: "HEALTHY", metrics: {}, register: nil, on_error: nil,
                          headers: nil, timeout: nil)
        own = (self.headers if respond_to?(:headers)) || {}
        Heartbeat.new(channel, kind, id: id, interval: interval, status: status, metrics: metrics,
                                     register: register, headers: own.merge(headers || {}), timeout: timeout,
                                     on_error: on_error)
      end
    end
  end

  module ControlPlane
    class Client
      include Heartbeat::Starter
    end
  end
end

at_exit { Flowctl::Heartbeat.stop_all(0.5) }
