# frozen_string_literal: true

require "socket"
require_relative "duration"

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
    # The seed protocol (obsrvr.flow.controlplane): what its beats send and how its
    # replies read, for the native thread (ext/flowctl/heartbeat_wire.c). Field numbers
    # are those of proto/controlplane/controlplane.proto; paths come from the service.
    module Seed
      KINDS = %i[processor source consumer].freeze
      STATUSES = Common::HealthStatus.values.sort_by { |_, n| n }.map { |name, _| name.to_s.freeze }.freeze

      PLANS = KINDS.to_h do |kind|
        rpc = ->(name) { ControlPlane::Service.rpc(name).path }
        [kind, {
          register_path: rpc.call(:"register_#{kind}"), beat_path: rpc.call(:"#{kind}_heartbeat"),
          # Register<Kind>Response{<kind>_id = 1, success = 2, message = 3}
          register_success: 2, register_message: 3,
          # <Kind>HeartbeatRequest{<kind>_id = 1, timestamp = 2, metrics = 3 map<string,double>, status = 4 string}
          beat_id: 1, beat_timestamp: 2, beat_metrics: 3, beat_status: 4, status_enum: false, metric_strings: false,
          # <Kind>HeartbeatResponse{success = 1, message = 2}: success: false means "register again"
          beat_success: 1, beat_message: 2,
          statuses: STATUSES.map { |name| [name, Common::HealthStatus.value(name)] },
          stopping: STATUSES.index("STOPPING")
        }.freeze]
      end.freeze

      module_function

      def register_request(kind, id, endpoint, metadata)
        klass = ControlPlane.const_get(:"Register#{kind.capitalize}Request")
        klass.new("#{kind}_id": id, endpoint: endpoint, metadata: metadata).to_proto
      end

      # {"name" => Numeric}: the native side sends each number as a double
      def metrics(metrics)
        Heartbeat.check_metrics(metrics, "Numeric") do |name, value|
          next if value.is_a?(Numeric)

          raise TypeError, "metric #{name.to_s.inspect} must be Numeric (given #{value.class})"
        end
      end

      def status_index(status) = STATUSES.index(Heartbeat.check_status(status))
      def status_value(name) = name
    end

    KINDS = Seed::KINDS
    STATUSES = Seed::STATUSES # HealthStatus names, from the enum

    attr_reader :kind, :id, :interval, :timeout, :protocol

    # Use Client#start_heartbeat; this is the same with the channel given explicitly
    # (a Flowctl::Native::Channel).
    def initialize(channel, kind, id:, interval:, status: "HEALTHY", metrics: {}, register: nil, headers: {},
                   timeout: nil, on_error: nil)
      @kind = Heartbeat.check_kind(kind)
      id = Heartbeat.check_id(id)
      endpoint, metadata = Heartbeat.register_args(register)
      request = Seed.register_request(@kind, id, endpoint || "", metadata || {})
      start(channel, Seed, Seed::PLANS.fetch(@kind).merge(register_first: !endpoint.nil?), request,
            id: id, interval: interval, status: status, metrics: metrics, headers: headers, timeout: timeout,
            on_error: on_error)
    end

    # Stops the thread: a final beat with status STOPPING (and for flowctl.v1 an
    # UnregisterComponent), bounded by timeout seconds, then joins. Calling it again does
    # nothing. Returns true; false in the rare case where the thread did not finish
    # within timeout + 2 seconds (it is then left to end on its own).
    def stop(timeout = 1.0)
      timeout = Heartbeat.check_seconds(:timeout, timeout, allow_zero: true)
      joined = native_stop(timeout)
      @error_thread.join(timeout + 1) if @error_thread && @error_thread != Thread.current
      joined
    end

    # What the next beat sends: a HealthStatus name (a String for the seed protocol,
    # a Symbol such as :HEALTH_STATUS_HEALTHY for flowctl.v1).
    def status = @protocol.status_value(native_status)

    def status=(status)
      native_set_status(@protocol.status_index(status))
    end

    # What the next beats send: {name => Numeric} (flowctl.v1 also takes Strings; its
    # numbers are sent as their decimal text).
    def metrics=(metrics)
      native_set_metrics(@protocol.metrics(metrics))
    end

    def inspect
      "#<Flowctl::Heartbeat #{kind} #{id.inspect} every #{interval}s #{running? ? 'running' : 'stopped'}>"
    end

    class << self
      # Starts a heartbeat from the environment (the variables `flowctl run` and the
      # flowctl SDK set):
      #   ENABLE_FLOWCTL              "true"/"1" to enable; otherwise returns nil
      #   FLOWCTL_ENDPOINT            control plane address (default "localhost:8080")
      #   FLOWCTL_COMPONENT_ID        the component id (default "<kind>-<hostname>-<pid>")
      #   FLOWCTL_HEARTBEAT_INTERVAL  a Go duration ("10s", "500ms", "1m30s") or seconds (default 10s)
      #   FLOWCTL_SERVICE_ID          set by `flowctl run`: the protocol is flowctl.v1
      # protocol: :v1 or :seed overrides the choice (FLOWCTL_PROTOCOL too). flowctl.v1 takes
      # component: {...ComponentInfo fields} (register: {endpoint:, metadata:} goes into it).
      # Other keywords go to start_heartbeat (register:, metrics:, status:, on_error:, ...);
      # client: keywords (tls:, headers:, channel_args:) go to the client. Without tls:,
      # a loopback endpoint (localhost, 127.0.0.1, [::1]) is reached in plaintext and any
      # other one with TLS (the client's default).
      def from_env(kind = :processor, env: ENV, client: {}, protocol: nil, **opts)
        config = config_from_env(env, kind: kind)
        return nil unless config

        client = {tls: false}.merge(client) if loopback?(config[:endpoint])
        if protocol_from_env(env, protocol) == :v1
          return V1::HeartbeatMethods.from_env(kind, config, env, client, opts)
        end

        cp = ControlPlane::Client.new(config[:endpoint], **client)
        cp.start_heartbeat(kind, id: config[:id], interval: config[:interval], **opts)
      end

      # :v1 or :seed: protocol: when given, else FLOWCTL_PROTOCOL ("v1", "seed"), else
      # :v1 when FLOWCTL_SERVICE_ID is set (as `flowctl run` does), else :seed.
      def protocol_from_env(env = ENV, protocol = nil)
        chosen = protocol || nonempty(env, "FLOWCTL_PROTOCOL")
        return nonempty(env, "FLOWCTL_SERVICE_ID") ? :v1 : :seed if chosen.nil?

        name = chosen.to_s.downcase.delete_prefix("flowctl.")
        return :v1 if name == "v1"
        return :seed if name == "seed"

        raise ArgumentError, "unknown heartbeat protocol #{chosen.inspect} (expected :v1 or :seed)"
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

      # A Go duration or seconds, more than zero and at most a day (Flowctl::Duration):
      # "10s" -> 10.0, "500ms" -> 0.5, "1m30s" -> 90.0, "2.5" -> 2.5, 3 -> 3.0
      def parse_interval(value, name: "interval")
        return check_interval(value) if value.is_a?(Numeric)

        seconds = Duration.parse(value.to_s, name: name)
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

        check_text(id, "id").dup.force_encoding(Encoding::UTF_8).freeze
      end

      # @api private: a String the thread sends: String or Symbol, UTF-8, no NUL byte.
      # Returns the String (allocates nothing for a String: metrics= runs often).
      def check_text(value, what)
        text = value.is_a?(Symbol) ? value.to_s : value
        raise TypeError, "#{what} must be a String or Symbol (given #{value.class})" unless text.is_a?(String)
        raise ArgumentError, "#{what} must not contain NUL bytes (given #{text.inspect})" if text.include?("\0")

        enc = text.encoding
        utf8ish = enc == Encoding::UTF_8 || enc == Encoding::US_ASCII || (enc == Encoding::BINARY && text.ascii_only?)
        raise ArgumentError, "#{what} must be valid UTF-8 (given #{text.inspect} in #{enc})" unless utf8ish && text.valid_encoding?

        text
      end

      # @api private: metrics (a Hash, or nil for none), each name checked and each value
      # given to the block (which raises on a bad one); `values` names what they may be.
      # Returns the Hash itself: the native side converts names and numbers.
      def check_metrics(metrics, values)
        return {} if metrics.nil?
        raise TypeError, "metrics must be a Hash of name => #{values} (given #{metrics.class})" unless metrics.is_a?(Hash)

        metrics.each do |name, value|
          check_text(name, "metric name")
          yield name, value
        end
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

          metadata = metadata.to_h do |k, v|
            [check_text(k, "register metadata key").to_s, check_text(v, "register metadata value").to_s]
          end
          [check_text(register.fetch(:endpoint, "").to_s, "register endpoint"), metadata]
        else
          raise TypeError, "register: must be a Hash {endpoint:, metadata:}, true or nil (given #{register.class})"
        end
      end

      # Stops every heartbeat thread of this process (also those whose Heartbeat was
      # garbage collected) and waits at most about timeout + 1 seconds for them. Returns
      # the number of threads still running (0 normally). Registered with at_exit.
      def stop_all(timeout = 1.0)
        native_stop_all(check_seconds(:timeout, timeout, allow_zero: true))
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

    # Common to both protocols: protocol is Seed or V1 (status and metrics checks), plan
    # its Hash for the native thread, request the encoded register request.
    def start(channel, protocol, plan, request, id:, interval:, status:, metrics:, headers:, timeout:, on_error:)
      @protocol = protocol
      @id = id
      @interval = Heartbeat.check_interval(interval)
      @timeout = timeout.nil? ? @interval.clamp(1.0, 5.0) : Heartbeat.check_seconds(:timeout, timeout)
      if !on_error.nil? && !on_error.respond_to?(:call)
        raise TypeError, "on_error must respond to #call (given #{on_error.class})"
      end

      start_native(channel, plan, request, id, @interval, protocol.status_index(status), protocol.metrics(metrics),
                   headers || {}, @timeout, !on_error.nil?)
      @error_thread = on_error && start_error_thread(on_error)
    end

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
