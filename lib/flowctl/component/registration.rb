# frozen_string_literal: true

module Flowctl
  module Component
    # Registration and heartbeats of a component, from the native heartbeat thread
    # (Flowctl::Heartbeat), plus one Ruby thread that hands it the current status and metrics
    # and notices when the first registration succeeded (the component is then ready).
    #
    # flowctl.v1 (the default): Flowctl::V1::ControlPlaneClient#start_heartbeat with the
    # component's ComponentInfo (component.id = FLOWCTL_COMPONENT_ID, endpoint "127.0.0.1:<port>",
    # its event types); the metrics map is String => String. Seed protocol (protocols: [:seed]
    # only): ControlPlane::Client#start_heartbeat(kind, register: {endpoint:, metadata:}).
    #
    # A control plane that is down at start, or restarts later, never stops the data plane:
    # the heartbeat thread retries in the background and registers again when it is back.
    class Registration
      SETTLE = 0.05 # how often to look for the first registration

      def initialize(runtime)
        @runtime = runtime
        @settings = runtime.settings
        @protocol = @settings.protocols.include?(:v1) ? :v1 : :seed
        @lock = Mutex.new
        @cond = ConditionVariable.new
        @pushed = false
        @closed = false
      end

      attr_reader :heartbeat, :protocol

      def start
        @client = new_client
        @heartbeat = @protocol == :v1 ? start_v1 : start_seed
        @thread = Thread.new { report_loop }
        @thread.name = "flowctl-component-report"
        @thread.report_on_exception = false
        self
      end

      def registered? = @registered ? true : false

      # Hands the heartbeat the current status and metrics now (not at the next tick).
      def push
        @lock.synchronize do
          @pushed = true
          @cond.signal
        end
      end

      # A final STOPPING beat (and unregistration, on flowctl.v1), then the threads end.
      def stop
        @lock.synchronize do
          @closed = true
          @cond.signal
        end
        @thread&.join(2)
        update
        @heartbeat&.stop(1.0)
        @client&.close
      end

      private

      def loopback? = Heartbeat.loopback?(@settings.control_plane)

      def new_client
        klass = if @protocol == :seed then Flowctl::ControlPlane::Client
                elsif Flowctl::V1.const_defined?(:ControlPlaneClient, false) then Flowctl::V1::ControlPlaneClient
                else Flowctl::ControlPlane::Client # only its channel is used
                end
        klass.new(@settings.control_plane, tls: loopback? ? false : nil)
      end

      # Everything explicit (component_id, interval): the settings already weighed the
      # environment against the keywords.
      def start_v1
        args = { component: @runtime.info, component_id: @settings.id, interval: @settings.heartbeat_interval,
                 status: status_name, metrics: metrics, on_error: method(:heartbeat_error), env: {} }
        if defined?(Flowctl::V1::HeartbeatMethods) && @client.is_a?(Flowctl::V1::HeartbeatMethods)
          @client.start_heartbeat(**args)
        elsif Flowctl::Heartbeat.respond_to?(:start_v1)
          Flowctl::Heartbeat.start_v1(@client.channel, headers: @client.headers, **args)
        else
          raise NotImplementedError, "this flowctl has no flowctl.v1 heartbeat (Flowctl::Heartbeat.start_v1): " \
                                     "run standalone (control_plane: false) or with protocols: [:seed]"
        end
      end

      def start_seed
        @client.start_heartbeat(@runtime.kind, id: @settings.id, interval: @settings.heartbeat_interval,
                                               status: status_name, metrics: metrics,
                                               register: { endpoint: @runtime.endpoint, metadata: seed_metadata },
                                               on_error: method(:heartbeat_error))
      end

      def seed_metadata
        info = @runtime.info
        info[:metadata].merge("name" => info[:name], "version" => info[:version],
                              "input_event_types" => info[:input_event_types].join(","),
                              "output_event_types" => info[:output_event_types].join(","))
      end

      def status_name
        s = @runtime.status
        @protocol == :v1 ? "HEALTH_STATUS_#{s}" : s
      end

      def metrics
        @protocol == :v1 ? @runtime.metrics.to_heartbeat : @runtime.metrics.to_numbers
      end

      def update
        return unless @heartbeat

        @heartbeat.metrics = metrics
        @heartbeat.status = status_name
      rescue StandardError => e
        @runtime.logger.warn("heartbeat update: #{e.class}: #{e.message}")
      end

      # Every SETTLE seconds until the first registration, then every min(interval, 1 s) or on #push.
      def report_loop
        loop do
          wait = @registered ? [@settings.heartbeat_interval, 1.0].min : SETTLE
          closed = @lock.synchronize do
            @cond.wait(@lock, wait) unless @pushed || @closed
            @pushed = false
            @closed
          end
          break if closed

          check_registered
          update
        end
      end

      def check_registered
        return if @registered
        return unless @heartbeat.stats[:registrations].to_i.positive?

        @registered = true
        @runtime.registered!
        @runtime.logger.info("registered with #{@settings.control_plane} as #{@settings.id}")
      end

      def heartbeat_error(error)
        @runtime.logger.debug("control plane #{@settings.control_plane}: #{error}")
      end
    end
  end
end
