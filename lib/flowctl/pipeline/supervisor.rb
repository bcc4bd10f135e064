# frozen_string_literal: true

module Flowctl
  module Pipeline
    # What the runner knows of a component from the control plane: status Symbol
    # (:HEALTH_STATUS_HEALTHY, ...), endpoint, registered_at (Time), metrics.
    ComponentInfo = Struct.new(:status, :endpoint, :registered_at, :metrics, keyword_init: true) do
      def healthy? = status.to_s.end_with?("HEALTHY") && !status.to_s.end_with?("UNHEALTHY")
    end

    # The control plane seen through flowctl.v1's GetComponentStatus (the runner's own
    # embedded one or --control-plane).
    class ControlPlaneView
      attr_reader :endpoint

      def initialize(endpoint)
        @endpoint = endpoint
        @client = Wire.client_class(:ControlPlaneClient).new(endpoint, tls: false, timeout: 2)
      end

      # ComponentInfo of the component registered under id, or nil.
      def info(id)
        r = @client.get_component_status(service_id: id)
        ComponentInfo.new(status: r.status, endpoint: r.component&.endpoint.to_s, registered_at: r.registered_at,
                          metrics: r.metrics.to_h)
      rescue Flowctl::NotFound, Flowctl::Unknown
        nil
      end

      def close = @client.close
    end

    # A component could not be started (never registered, exited at once, ...): names it,
    # says why and shows its last output lines.
    class StartError < Flowctl::Error; end

    # Starts every component of a Definition as a child process with flowctl run's
    # environment, waits (bounded) until each has registered as HEALTHY, restarts those
    # that crash according to their restart policy, and stops them in order. It is the
    # Router's hooks: #connect gives a link to a ready component, #broken says whether to
    # reconnect.
    class Supervisor
      # One component's process and state: :starting, :ready, :restarting, :failed, :stopped,
      # :finished (with self-wiring components: it exited by itself, status 0).
      Slot = Struct.new(:component, :child, :state, :endpoint, :restarts, :error, :health_port, :done, :breaks,
                        :registered_at, keyword_init: true)

      POLL = 0.05

      attr_reader :slots

      # view: a ControlPlaneView (or anything with #info(id)); control_plane: the
      # "host:port" components get as FLOWCTL_ENDPOINT; log: callable(component, line);
      # notify: callable(String) for the runner's own messages; health_ports: :free (a free
      # port per component) or :flowctl (18080 + n, as flowctl run); link: callable
      # (component, endpoint) -> link (Wire.link by default); wiring: "runner" (the Router
      # moves the events) or "discovery" (the components find their inputs themselves; a
      # clean exit is the end of a component's work, not a failure); params: the
      # StreamRequest params self-wiring components pass to their inputs.
      def initialize(definition, view, control_plane:, log: nil, notify: nil, health_ports: :free, link: nil, chdir: nil,
                     wiring: definition.wiring, params: {})
        @definition = definition
        @view = view
        @control_plane = control_plane
        @log = log
        @notify = notify || ->(_msg) {}
        @health_ports = health_ports
        @link = link || ->(c, endpoint) { Wire.link(c, endpoint) }
        @chdir = chdir
        @wiring = wiring
        @params = params
        @lock = Mutex.new
        @changed = ConditionVariable.new
        @stopping = false
        @slots = definition.components.to_h do |c|
          [c.id, Slot.new(component: c, state: :starting, restarts: 0, breaks: 0, done: false)]
        end
      end

      # The environment of a component: the YAML's (config as UPPER_SNAKE, env), then
      # what flowctl run injects over it, then this gem's extensions for components that
      # read their inputs themselves (Flowctl::Discovery::Upstream.from_env): FLOWCTL_WIRING
      # ("runner" or "discovery"), FLOWCTL_INPUTS (ids, comma-separated),
      # FLOWCTL_INPUT_EVENT_TYPES (the YAML's input_event_types, comma-separated) and, with
      # discovery, FLOWCTL_STREAM_PARAMS (the StreamRequest params as a JSON object).
      def environment(component, health_port)
        interval = @definition.heartbeat_interval
        env = component.env.merge(
          "ENABLE_FLOWCTL" => "true",
          "FLOWCTL_ENDPOINT" => @control_plane,
          "FLOWCTL_HEARTBEAT_INTERVAL" => Supervisor.go_duration(interval),
          "FLOWCTL_SERVICE_ID" => component.id,
          "FLOWCTL_COMPONENT_ID" => component.id,
          "FLOWCTL_WIRING" => @wiring,
          "FLOWCTL_INPUTS" => component.inputs.join(","),
          "FLOWCTL_INPUT_EVENT_TYPES" => component.input_event_types.join(",")
        )
        env["FLOWCTL_STREAM_PARAMS"] = JSON.generate(@params) if self_wired? && !@params.empty?
        env["HEALTH_PORT"] ||= health_port.to_s
        env
      end

      def self_wired? = @wiring == "discovery"

      # Have these components finished their work by themselves (self-wired, exit status 0)?
      def finished?(ids) = @lock.synchronize { ids.all? { |id| @slots.fetch(id).state == :finished } }

      # The first component that is gone for good: [component, error] or nil.
      def failure
        @lock.synchronize do
          slot = @slots.each_value.find { |s| s.state == :failed }
          slot && [slot.component, slot.error]
        end
      end

      # Waits up to timeout seconds for a change of any component's state.
      def wait_change(timeout) = @lock.synchronize { @changed.wait(@lock, timeout) }

      # 10.0 -> "10s", 0.25 -> "250ms" (what Go's time.ParseDuration reads)
      def self.go_duration(seconds)
        ms = (seconds * 1000).round
        (ms % 1000).zero? ? "#{ms / 1000}s" : "#{ms}ms"
      end

      # Starts sources, then processors, then sinks, and waits until all are ready.
      # Raises StartError naming every component that did not come up.
      def start_all
        slots = @slots.values
        slots.each { |s| spawn(s) }
        waiters = slots.map { |s| Thread.new { await_ready(s, s.child.started_at) } }
        results = waiters.map(&:value)
        errors = results.grep(String)
        raise StartError, errors.join("\n") unless errors.empty?

        slots.zip(results).each do |s, result|
          next finish(s, " before the runner saw it registered") if result == :finished

          set(s, :ready)
          start_monitor(s)
        end
      end

      # Router hook: a link to the component once it is ready.
      def connect(component)
        slot = @slots.fetch(component.id)
        endpoint = @lock.synchronize do
          @changed.wait(@lock, 1) until %i[ready failed stopped].include?(slot.state)
          raise Router::Failed, slot.error || "#{component.label} was stopped" unless slot.state == :ready

          slot.endpoint
        end
        @link.call(component, endpoint)
      end

      # Router hook: a link broke. True to reconnect (the component is restarting or
      # still alive); raises Router::Failed (naming it, with its last output) when it is
      # gone for good.
      def broken(component, err)
        slot = @slots.fetch(component.id)
        return false if @stopping

        slot.child&.wait(1.0) # the process may have died: let its monitor see it
        @lock.synchronize do
          deadline = monotonic + 2
          @changed.wait(@lock, 0.1) while slot.state == :ready && slot.child&.exited? && monotonic < deadline
          raise Router::Failed, slot.error if slot.state == :failed

          slot.breaks += 1
          limit = (component.restart.max_restarts || Float::INFINITY) + 1
          if slot.state == :ready && slot.breaks > limit
            raise Router::Failed, "#{component.label}: its stream broke #{slot.breaks} times in a row (#{err.class}: #{err.message})"
          end
          true
        end
      end

      # Router hook: where a source resumes when the runner has not seen an event of it yet.
      def resume_token(component)
        slot = @slots.fetch(component.id)
        link = @link.call(component, slot.endpoint)
        link.respond_to?(:saved_token) ? link.saved_token : nil
      rescue StandardError
        nil
      end

      # The router is done with a component: it is not restarted any more.
      def done(component) = @lock.synchronize { @slots.fetch(component.id).done = true }

      def restarts = @slots.transform_values(&:restarts)

      # Stops the components of these roles (SIGTERM to each group, SIGKILL after grace).
      def stop(roles, grace:)
        targets = @slots.values.select { |s| roles.include?(s.component.role) }
        targets.each { |s| @lock.synchronize { s.done = true } }
        targets.map { |s| Thread.new { s.child&.stop(grace: grace) } }.each(&:join)
        targets.each { |s| set(s, :stopped) unless s.state == :finished }
      end

      # Stops everything (sources, processors, sinks), at most grace seconds each.
      def stop_all(grace:)
        @stopping = true
        %i[source processor sink].each { |role| stop([role], grace: grace) }
      end

      private

      def set(slot, state, error: nil)
        @lock.synchronize do
          slot.state = state
          slot.error = error if error
          @changed.broadcast
        end
      end

      def spawn(slot)
        c = slot.component
        slot.health_port ||= c.health_port || (@health_ports == :flowctl ? 18_080 + c.index : Ports.free)
        slot.child = Child.spawn(c, environment(c, slot.health_port), log: @log, chdir: @chdir)
      end

      # nil once the component has registered as HEALTHY since `since`, else why not (a
      # String); :finished when a self-wiring component did its work and exited with
      # status 0 before it was seen registered (it may register, work and unregister
      # between two looks).
      def await_ready(slot, since)
        c = slot.component
        deadline = monotonic + c.ready_timeout
        last = nil
        loop do
          last = safe_info(c.id)
          if last&.healthy? && !last.endpoint.empty? && fresh?(slot, last, since)
            slot.endpoint = last.endpoint
            slot.registered_at = last.registered_at
            return nil
          end
          if slot.child.exited?
            return :finished if self_wired? && slot.child.clean_exit? && !c.restart.restart?(true)

            return not_ready(slot, "exited (#{slot.child.describe_exit}) before it registered")
          end
          return not_ready(slot, timeout_reason(c, last)) if monotonic > deadline

          sleep POLL
        end
      end

      # A registration made by this process: made after it started (the control plane's
      # clock; a persisted control plane may still hold a registration of an earlier run,
      # and a process killed a moment ago may have registered just before), and after a
      # restart at another endpoint or one that accepts connections.
      def fresh?(slot, info, since)
        return info.registered_at.nil? || info.registered_at >= since - 0.5 unless slot.endpoint
        return false if info.registered_at && info.registered_at < since

        info.endpoint != slot.endpoint || listening?(info.endpoint)
      end

      def listening?(endpoint)
        host, port = endpoint.rpartition(":").values_at(0, 2)
        Socket.tcp(host.delete("[]"), Integer(port), connect_timeout: 0.2).close
        true
      rescue SystemCallError, SocketError, ArgumentError, IOError
        false
      end

      def safe_info(id)
        @view.info(id)
      rescue Flowctl::RPCError
        nil
      end

      def timeout_reason(component, info)
        state = info ? "registered, status #{info.status}" : "not registered"
        "did not register as HEALTHY with the control plane within #{component.ready_timeout}s (#{state}; " \
          "it must register with component.id = FLOWCTL_COMPONENT_ID #{component.id.inspect})"
      end

      def not_ready(slot, why)
        lines = slot.child.last_lines(10)
        output = if slot.child.printed?
                   "; last output:\n" + lines.map { |l| "    #{l}" }.join("\n")
                 else
                   "; it printed nothing"
                 end
        "#{slot.component.label} (#{slot.component.argv.join(' ')}): #{why}#{output}"
      end

      # Restarts a component that exits while the pipeline runs, as its policy says.
      def start_monitor(slot)
        Thread.new do
          Thread.current.name = "pipeline-supervise #{slot.component.id}"
          Thread.current.report_on_exception = false
          watch(slot)
        end
      end

      def watch(slot)
        loop do
          child = slot.child
          child.wait
          return set(slot, :stopped) if @stopping || slot.done

          policy = slot.component.restart
          return finish(slot) if self_wired? && child.clean_exit? && !policy.restart?(true)
          if !policy.restart?(child.clean_exit?) || (policy.max_restarts && slot.restarts >= policy.max_restarts)
            why = "#{child.describe_exit} (restart policy #{policy.policy}, #{slot.restarts} restart(s) done)"
            return set(slot, :failed, error: not_ready(slot, why))
          end
          return unless restart(slot, policy)
        end
      end

      def finish(slot, note = "")
        @lock.synchronize { slot.done = true }
        set(slot, :finished)
        @notify.call("#{slot.component.label} finished (exited with status 0#{note})")
      end

      def restart(slot, policy)
        set(slot, :restarting)
        delay = policy.delay(slot.restarts)
        @notify.call("#{slot.component.label} #{slot.child.describe_exit}; restarting in #{delay.round(2)}s")
        sleep delay
        return set(slot, :stopped) && false if @stopping || slot.done

        slot.restarts += 1
        spawn(slot)
        error = await_ready(slot, slot.child.started_at)
        return finish(slot, " before the runner saw it registered") && false if error == :finished
        if error
          slot.child.stop(grace: 1)
          set(slot, :failed, error: error)
          return false
        end
        @lock.synchronize { slot.breaks = 0 }
        set(slot, :ready)
        @notify.call("#{slot.component.label} restarted (#{slot.restarts}), at #{slot.endpoint}")
        true
      end

      def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
