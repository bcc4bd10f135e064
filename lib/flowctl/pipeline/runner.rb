# frozen_string_literal: true

require "fileutils"

module Flowctl
  module Pipeline
    # The embedded control plane of a run: Flowctl::ControlPlane::Registry serving
    # flowctl.v1 (and the seed's protocol) and the gem's live configuration extension
    # (Flowctl::Config::Service) on 127.0.0.1, port 0; all persisted in db when given.
    class EmbeddedControlPlane
      attr_reader :endpoint, :registry, :config

      def initialize(db: nil)
        @db = db
      end

      def start
        @registry = @db ? Flowctl::ControlPlane::Registry.new(db: @db) : Flowctl::ControlPlane::Registry.new
        @config = Config::Service.new(Config::Store.new(@db), acknowledged: method(:acknowledged))
        @server = Flowctl::Server.new(host: "127.0.0.1", port: 0, tls: false)
        @server.handle(Flowctl::V1::ControlPlaneService, @registry)
        @server.handle(Flowctl::ControlPlane::Service, @registry)
        @server.handle(Flowctl::Ext::V1::ConfigService, @config)
        @endpoint = "127.0.0.1:#{@server.start}"
        @registry.endpoint = @endpoint if @registry.respond_to?(:endpoint=)
        self
      end

      # The config version a component last reported in its heartbeat metrics.
      def acknowledged(id)
        c = @registry.respond_to?(:component) ? @registry.component(id) : nil
        c&.metrics&.fetch(Config::Service::ACK_KEY, nil)
      end

      def stop
        @config&.stop
        @server&.stop(grace: 1)
        @registry.close if @registry.respond_to?(:close)
        @config&.store&.close
      end
    end

    # Runs a Definition: the control plane (embedded unless control_plane: "host:port"
    # is given), every component as a child process (Supervisor), the data plane
    # (Router), live progress (Progress), the run's record (RunStore); stops in order on
    # SIGINT/SIGTERM (sources first, then the rest drains, sinks last) within the
    # pipeline's shutdown_grace; a second signal kills at once. No child outlives #run.
    #
    #   run = Flowctl::Pipeline::Runner.new(definition, db: "flowctl.db").run
    #   run.status   # => "COMPLETED", "FAILED" or "STOPPED"
    class Runner
      attr_reader :run_id, :supervisor, :router, :control_plane

      # control_plane: "host:port" of a running control plane (nil: embedded); db: SQLite
      # file of the embedded control plane and of the run records; store: a RunStore (by
      # default RunStore.open(db)); out: progress (a table on a terminal, JSON lines
      # otherwise; nil: none); err: the runner's messages; log_dir: a file per component
      # for its output; verbose: copy component output to err; health_ports: :free or
      # :flowctl (18080 + n); params: StreamRequest params for the sources; wiring:
      # "runner" or "discovery" (default: the definition's spec.wiring; with discovery the
      # components read their inputs themselves and the runner only supervises, SelfWired).
      def initialize(definition, control_plane: nil, db: nil, store: nil, out: $stdout, err: $stderr, log_dir: nil,
                     verbose: false, health_ports: :free, progress_interval: 1.0, params: {}, view: nil, link: nil,
                     wiring: nil)
        @definition = definition
        @control_plane_arg = control_plane
        @db = db
        @store = store || RunStore.open(db)
        @out = out
        @err = err
        @log_dir = log_dir
        @verbose = verbose
        @health_ports = health_ports
        @interval = progress_interval
        @params = params
        @view = view
        @link = link
        @wiring = wiring || definition.wiring
        unless Definition::WIRINGS.include?(@wiring)
          raise ArgumentError, "wiring: #{@wiring.inspect} is not one of #{Definition::WIRINGS.join(', ')}"
        end
        if @wiring == "discovery" && definition.dead_letter
          raise ArgumentError, "wiring: discovery cannot route to the dead-letter sink #{definition.dead_letter.inspect}"
        end
        @stop_requested = false
        @kill_requested = false
        @wake_r, @wake_w = IO.pipe
      end

      # Runs to the end; returns the RunStore::Run as recorded.
      def run
        @run_id = @store.create(name: @definition.name, definition: @definition.text).id
        traps = install_traps
        status, error = execute
        record(status, error)
      rescue StandardError => e
        record("FAILED", "#{e.class}: #{e.message}") if @run_id
        raise
      ensure
        cleanup
        restore_traps(traps) if traps
      end

      # Asks the run to stop in order (what SIGINT/SIGTERM do); a second call kills.
      def request_stop
        @kill_requested = true if @stop_requested
        @stop_requested = true
        @wake_w.write_nonblock(".", exception: false)
      end

      private

      def execute
        start_control_plane
        view = @view || ControlPlaneView.new(@control_plane)
        @supervisor = Supervisor.new(@definition, view, control_plane: @control_plane, log: log_sink, notify: method(:say),
                                                        health_ports: @health_ports, link: @link || method(:wire_link),
                                                        wiring: @wiring, params: @params)
        say "run #{@run_id}: #{@definition.name} (#{@definition.components.size} components), control plane " \
            "#{@control_plane}#{self_wired? ? ', components wire themselves (discovery)' : ''}"
        @supervisor.start_all
        return ["STOPPED", nil] if @stop_requested

        store_update(status: "RUNNING")
        # the data plane: the Router, or only a view of the components' own (SelfWired)
        @router = self_wired? ? SelfWired.new(@definition, @supervisor, view) : Router.new(@definition, @supervisor).start
        watch
      rescue StartError, Router::Failed => e
        ["FAILED", e.message]
      end

      def self_wired? = @wiring == "discovery"

      def wire_link(component, endpoint)
        Wire.link(component, endpoint, params: @params)
      end

      def start_control_plane
        if @control_plane_arg
          @control_plane = @control_plane_arg
        else
          @embedded = EmbeddedControlPlane.new(db: @db).start
          @control_plane = @embedded.endpoint
        end
      end

      # Shows progress until the data plane is done or a stop is asked for.
      def watch
        progress = @out && Progress.new(@out, @run_id)
        last_record = monotonic
        until @router.finished?
          wait_tick
          return graceful_stop(progress) if @stop_requested

          progress&.update(@router.snapshot, @supervisor.restarts, "RUNNING")
          if monotonic - last_record > 5
            store_update(counts: counts)
            last_record = monotonic
          end
        end
        @router.wait(0)
        progress&.update(@router.snapshot, @supervisor.restarts, "COMPLETED")
        ["COMPLETED", nil]
      rescue Router::Failed => e
        progress&.update(@router.snapshot, @supervisor.restarts, "FAILED")
        ["FAILED", e.message]
      end

      def wait_tick
        IO.select([@wake_r], nil, nil, @interval)
        @wake_r.read_nonblock(64, exception: false)
      end

      # Sources first; what is in flight drains through processors to the sinks; then
      # processors and sinks stop. Past the grace period everything is cancelled.
      def graceful_stop(progress)
        deadline = monotonic + @definition.shutdown_grace
        say "stopping: sources first, then draining (grace #{@definition.shutdown_grace}s)"
        @router.stop_sources
        @supervisor.stop([:source], grace: left(deadline))
        drained = self_wired? ? @router.drain(deadline) : false
        until drained || self_wired? || @kill_requested || monotonic > deadline
          drained = begin
            @router.wait([left(deadline), 0.2].min)
          rescue Router::Failed
            true
          end
        end
        @router.abort unless drained
        progress&.update(@router.snapshot, @supervisor.restarts, "STOPPED")
        ["STOPPED", drained ? nil : "not drained within #{@definition.shutdown_grace}s: events in flight were dropped"]
      end

      def left(deadline) = [deadline - monotonic, 0.05].max

      def counts
        snap = @router ? @router.snapshot : {}
        restarts = @supervisor ? @supervisor.restarts : {}
        @definition.components.to_h do |c|
          [c.id, (snap[c.id] || {}).merge("role" => c.role.to_s, "restarts" => restarts.fetch(c.id, 0))]
        end
      end

      def record(status, error)
        say "run #{@run_id}: #{status}#{error ? ": #{error}" : ''}"
        @store.update(@run_id, status: status, counts: counts, error: error)
      end

      # A record made while the pipeline runs: a store that fails is reported, the run goes on.
      def store_update(**fields)
        @store.update(@run_id, **fields)
      rescue Flowctl::Error => e
        say "could not record the run: #{e.message}"
      end

      def cleanup
        @router&.abort unless @router.nil? || @router.finished?
        grace = @kill_requested ? 0.1 : [@definition.shutdown_grace, 5].min
        @supervisor&.stop_all(grace: grace)
        Child.kill_all
        @embedded&.stop
        @logs&.each_value(&:close)
      end

      def say(message)
        @err&.puts("flowctl-pipeline: #{message}")
      end

      def log_sink
        if @log_dir
          FileUtils.mkdir_p(@log_dir)
          @logs = {}
          lock = Mutex.new
          lambda do |c, line|
            lock.synchronize { (@logs[c.id] ||= File.open(File.join(@log_dir, "#{c.id}.log"), "a")).write(line) }
          end
        elsif @verbose
          ->(c, line) { @err.write("[#{c.id}] #{line}") }
        end
      end

      def install_traps
        return nil unless Thread.current == Thread.main

        %w[INT TERM].to_h { |sig| [sig, trap(sig) { request_stop }] }
      end

      def restore_traps(traps)
        traps.each { |sig, handler| trap(sig, handler || "DEFAULT") }
      end

      def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
