# frozen_string_literal: true

module Flowctl
  module Component
    # Runs one component: its gRPC server (the flowctl.v1 service of its kind, grpc.health.v1,
    # and the seed's ProcessorService when asked), the HTTP health server, registration and
    # heartbeats (Registration), metrics, and shutdown.
    #
    # Shutdown (#stop, or SIGTERM/SIGINT under Klass.run): readiness and status go to
    # STOPPING; every stream finishes the event it is processing and then ends (a consumer
    # answers its ConsumeResponse with what it consumed); streams waiting for their next event
    # are ended at once; whatever still runs after `grace` seconds is cancelled. Then the
    # heartbeat sends STOPPING and unregisters, and the health server closes.
    class Runtime
      LAST_CALLS = 0.5 # seconds for unary calls in flight once every stream has ended

      attr_reader :component, :settings, :metrics, :logger, :port, :gate, :registration, :grpc_health, :live_config

      # The component's configuration now: settings.config, then each live version applied
      # (LiveConfig). A frozen Hash, swapped whole.
      attr_accessor :config

      def initialize(component, settings, logger: nil)
        @component = component
        @settings = settings
        @config = settings.config
        @metrics = Metrics.new
        @gate = Gate.new(settings.max_concurrent)
        @logger = logger || default_logger(settings.id)
        @status = "STARTING"
        @lock = Mutex.new
        @streams = Streams.new
        @stopped = false
        @failures_logged = 0
        # grpc.health.v1: "" and the component's service, SERVING while ready and HEALTHY/DEGRADED
        @grpc_health = Flowctl::Health.new(:NOT_SERVING)
        @health_names = ["", "flowctl.v1.#{kind.capitalize}Service"].freeze
        sync_grpc_health
        component.attach(self)
      end

      def kind = component.class.kind

      def stopping? = @streams.stopping?

      # "127.0.0.1:<port>": what the control plane is told to dial.
      def endpoint
        settings.endpoint || "#{settings.host == '0.0.0.0' || settings.host == '::' ? '127.0.0.1' : settings.host}:#{port}"
      end

      def health_port = @health&.port

      # The ComponentInfo fields of this component.
      def info
        i = component.class.component_info
        { id: settings.id, name: i[:name], description: i[:description], version: i[:version],
          type: :"COMPONENT_TYPE_#{kind.upcase}", input_event_types: i[:input_event_types],
          output_event_types: i[:output_event_types], endpoint: endpoint, metadata: i[:metadata] }
      end

      def status
        return "STOPPING" if stopping?

        @lock.synchronize { @status }
      end

      def status=(value)
        name = value.to_s.upcase.delete_prefix("HEALTH_STATUS_")
        unless %w[HEALTHY DEGRADED UNHEALTHY].include?(name)
          raise ArgumentError, "status must be :healthy, :degraded or :unhealthy (given #{value.inspect})"
        end

        @lock.synchronize { @status = name }
        sync_grpc_health
        @registration&.push
      end

      # Ready: registered with the control plane (at once when standalone), and not stopping.
      def ready? = @ready ? !stopping? : false

      # call-seq: start -> self
      def start
        component.setup
        @server = Server.new(host: settings.host, port: settings.port, tls: false,
                             pool_size: [settings.max_concurrent.to_i, 0].max + 32)
        Services.mount(@server, self)
        @port = @server.start
        start_health
        @lock.synchronize { @status = "HEALTHY" }
        sync_grpc_health
        start_registration
        logger.info("#{kind} #{settings.id} serving on #{endpoint}" \
                    "#{health_port ? ", health on #{settings.health_host}:#{health_port}" : ''}" \
                    "#{settings.enabled ? ", control plane #{settings.control_plane}" : ' (standalone)'}")
        self
      rescue StandardError
        @server&.stop(grace: 0)
        @health&.stop
        raise
      end

      # Blocks until SIGTERM or SIGINT, then #stop. Restores the previous handlers.
      def wait_for_signal
        r, w = IO.pipe
        old = %w[TERM INT].to_h { |sig| [sig, trap(sig) { w.write_nonblock(sig[0], exception: false) }] }
        begin
          IO.select([r])
        ensure
          old.each { |sig, handler| trap(sig, handler || "DEFAULT") }
        end
        logger.info("signal received: draining (grace #{settings.grace}s)")
        stop
      ensure
        r&.close
        w&.close
      end

      # call-seq: stop(grace: settings.grace) -> self
      def stop(grace: settings.grace)
        first = @lock.synchronize do
          was = @stopped
          @stopped = true
          !was
        end
        return self unless first

        deadline = clock + grace
        @grpc_health.shutdown # NOT_SERVING, and every Watch ends
        @registration&.push # a STOPPING beat now (the status reads STOPPING from here on)
        drained = @streams.drain(deadline)
        # Flowctl::Server#stop waits its whole grace while a client keeps its connection open,
        # even with no call left: once the streams are done, unary calls get at most LAST_CALLS.
        left = [deadline - clock, 0].max
        @server&.stop(grace: drained ? [left, LAST_CALLS].min : left)
        stop_live_config
        @discovery&.close
        @registration&.stop
        @health&.stop
        component.teardown
        m = metrics.to_numbers
        logger.info("stopped: received #{m['events_received']}, emitted #{m['events_emitted']}, " \
                    "failed #{m['events_failed']}, dropped #{m['events_dropped']}")
        self
      end

      # Runs a stream's handler so that #stop can end it (see Streams); yields the stream's
      # Metrics::Tally, where #run_event counts its events without a lock.
      def stream
        tally = metrics.tally
        @streams.run { yield tally }
      ensure
        metrics.retire(tally) if tally
      end

      # Reads the next request of a stream, or nil when the stream is to end (shutdown). A
      # message that is not a valid event fails that event (counted, logged) and the stream
      # goes on with the next.
      def read(requests)
        @streams.read(requests)
      rescue Flowctl::Server::InvalidRequest => e
        metrics.failed
        failed(nil, e)
        retry
      end

      # Ends a stream cut short by shutdown with UNAVAILABLE (its peer may resume elsewhere);
      # nil otherwise.
      def check_stopping
        raise Flowctl::Unavailable, "component #{settings.id} is shutting down" if stopping?
      end

      # See Streams#interruptible and Streams#critical.
      def interruptible(&block) = @streams.interruptible(&block)

      def streams_critical(&block) = @streams.critical(&block)

      # One event through the component's method: max_concurrent, metrics, and failures
      # (counted, logged, handed to #dead_letter). Returns the block's result, or a
      # Runtime::Failure with the error when it raised.
      # tally: the stream's (#stream).
      def run_event(event, tally, outputs: true, &block)
        return measure(event, tally, outputs, &block) if gate.limit.nil?

        gate.pass { measure(event, tally, outputs, &block) }
      end

      # What #run_event returns for an event whose processing raised.
      Failure = Struct.new(:error)

      # A failed event: logged (the first 10, then one in 1000), handed to the dead-letter hook.
      def failed(event, error)
        n = (@failures_logged += 1)
        if n <= 10 || (n % 1000).zero?
          what = if event.nil? then "a message that is no event"
                 elsif event.respond_to?(:id) then "event #{event.id.inspect}"
                 else "a #{event.class}"
                 end
          logger.warn("#{what} failed: #{error.class}: #{error.message}" \
                      "#{n == 10 ? ' (further failures are logged one in 1000)' : ''}")
        end
        component.dead_letter(event, error)
      rescue StandardError => e
        logger.error("dead_letter raised #{e.class}: #{e.message}")
      end

      # The JSON of /health, /ready and /live.
      def health_report
        { status: status, ready: ready? ? true : false, component: settings.id, kind: kind.to_s,
          registered: @registration ? @registration.registered? : false, metrics: metrics.to_numbers }
      end

      def prometheus_text = metrics.to_prometheus(settings.id)

      def clock = Process.clock_gettime(Process::CLOCK_MONOTONIC)

      def inspect = "#<#{self.class} #{kind} #{settings.id} #{endpoint} #{status}>"

      # Registration calls this once the control plane has the component: ready, and live
      # configuration is watched from now on (LiveConfig).
      def registered!
        @ready = true
        sync_grpc_health
        start_live_config
      end

      # call-seq: discover(type: nil, event_types: [], metadata: {}) -> [Flowctl::V1::ComponentInfo]
      #
      # The components registered with this component's control plane that match (see
      # Flowctl::Discovery.discover). Flowctl::Error when the component runs standalone.
      def discover(type: nil, event_types: [], metadata: {})
        raise Flowctl::Error, "component #{settings.id} runs standalone (no control plane): nothing to discover" unless settings.enabled

        require_relative "../discovery"
        client = @lock.synchronize do
          raise Flowctl::Error, "component #{settings.id} is stopped" if @stopped

          @discovery ||= Flowctl::Discovery.client(settings.control_plane)
        end
        Flowctl::Discovery.discover(client, type: type, event_types: event_types, metadata: metadata)
      end

      private

      # The per-event path of every processor and consumer: keep it lean (bench/pipeline.rb).
      def measure(event, tally, outputs)
        tally.begin_event
        t0 = clock
        emitted = nil
        result = yield
        emitted = outputs ? count_outputs(result) : 0
        result
      rescue StandardError, ScriptError => e
        failed(event, e)
        Failure.new(e)
      ensure
        t1 = clock
        tally.end_event(t1 - t0, t1, emitted || 0, emitted.nil?)
      end

      def default_logger(id)
        Logger.new($stderr, progname: id).tap do |l|
          l.level = ENV["FLOWCTL_LOG_LEVEL"] ? ENV["FLOWCTL_LOG_LEVEL"].upcase : Logger::INFO
        end
      end

      def count_outputs(result)
        case result
        when nil then 0
        when Array then result.size
        else 1
        end
      end

      def start_health
        return if settings.health_port.nil?

        @health = HealthServer.new(self, host: settings.health_host, port: settings.health_port)
        @health.start
      end

      def start_registration
        if settings.enabled
          @registration = Registration.new(self)
          @registration.start
        else
          registered!
        end
      end

      def start_live_config
        @lock.synchronize do
          return if @stopped || @live_config || !LiveConfig.wanted?(self)

          @live_config = LiveConfig.new(self).start
        end
      rescue StandardError => e
        logger.error("live configuration: #{e.class}: #{e.message}")
      end

      def stop_live_config
        live = @lock.synchronize { @live_config }
        live&.stop
      end

      def sync_grpc_health
        return if stopping?

        serving = ready? && %w[HEALTHY DEGRADED].include?(status) ? :SERVING : :NOT_SERVING
        @health_names.each { |name| @grpc_health.set(name, serving) }
      end
    end
  end
end
