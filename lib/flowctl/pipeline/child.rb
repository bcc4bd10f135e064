# frozen_string_literal: true

require "socket"

module Flowctl
  module Pipeline
    # One component process: spawned in its own process group (so that a signal to the
    # group reaches everything it started, and the terminal's Ctrl-C reaches only the
    # runner, which stops components in order), with stdout and stderr read by a thread
    # that keeps the last lines for error messages and may copy them to a log.
    #
    #   child = Child.spawn(component, env, log: $stderr)
    #   child.alive?; child.last_lines; child.stop(grace: 5)   # TERM to the group, KILL after grace
    class Child
      LAST_LINES = 20

      attr_reader :component, :pid, :started_at, :status

      # Every child still running (killed at exit if the runner could not stop them).
      @all = {}
      @all_lock = Mutex.new
      class << self
        def track(child) = @all_lock.synchronize { @all[child.pid] = child }
        def untrack(child) = @all_lock.synchronize { @all.delete(child.pid) }
        def running = @all_lock.synchronize { @all.values }

        # Kills every process group still running (at_exit, last resort).
        def kill_all
          running.each { |c| c.kill }
        end

        def spawn(component, env, log: nil, chdir: nil)
          new(component, env, log: log, chdir: chdir)
        end
      end

      def initialize(component, env, log: nil, chdir: nil)
        @component = component
        @log = log
        @lines = []
        @bytes = 0
        @lock = Mutex.new
        @exited = ConditionVariable.new
        reader, writer = IO.pipe
        opts = { pgroup: true, in: File::NULL, out: writer, err: writer, unsetenv_others: false, close_others: true }
        opts[:chdir] = chdir if chdir
        @started_at = Time.now
        begin
          @pid = Process.spawn(env, *component.argv, **opts)
        rescue SystemCallError => e
          reader.close
          raise Flowctl::Error, "#{component.label}: cannot start #{component.argv.first}: #{e.message}"
        ensure
          writer.close
        end
        Child.track(self)
        @output = start_reader(reader)
        @waiter = start_waiter
      end

      def alive? = @lock.synchronize { @status.nil? }
      def exited? = !alive?

      # Has it written anything to stdout or stderr?
      def printed? = @lock.synchronize { @bytes.positive? }

      def last_lines(n = LAST_LINES) = @lock.synchronize { @lines.last(n).dup }

      # Waits up to timeout seconds for the process to end; true when it has.
      def wait(timeout = nil)
        deadline = timeout && (Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout)
        @lock.synchronize do
          while @status.nil?
            left = deadline && (deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC))
            return false if left && left <= 0

            @exited.wait(@lock, left)
          end
        end
        true
      end

      # SIGTERM to the process group, SIGKILL after grace seconds. Returns the status.
      def stop(grace: 5.0)
        signal("TERM")
        kill unless wait(grace)
        wait
        @output.join(1)
        status
      end

      # SIGKILL to the whole process group at once.
      def kill
        signal("KILL")
      end

      def signal(name)
        Process.kill(name, -@pid) if alive?
      rescue Errno::ESRCH, Errno::EPERM
        nil
      end

      # "exited with status 1", "killed by SIGKILL", "running"
      def describe_exit
        st = @lock.synchronize { @status }
        return "running" if st.nil?
        return "exited with status #{st.exitstatus}" if st.exited?

        "killed by SIG#{Signal.signame(st.termsig)}"
      end

      def clean_exit? = @lock.synchronize { @status&.success? || false }

      private

      def start_reader(io)
        Thread.new do
          Thread.current.name = "pipeline-log #{component.id}"
          Thread.current.report_on_exception = false
          io.each_line do |line|
            @lock.synchronize do
              @bytes += line.bytesize
              @lines << line.chomp.scrub
              @lines.shift if @lines.size > LAST_LINES * 4
            end
            @log&.call(component, line)
          end
        rescue IOError
          nil
        ensure
          io.close unless io.closed?
        end
      end

      def start_waiter
        Thread.new do
          Thread.current.name = "pipeline-wait #{component.id}"
          Thread.current.report_on_exception = false
          _, st = Process.wait2(@pid)
          # the group may still hold processes the component started
          begin
            Process.kill("KILL", -@pid)
          rescue Errno::ESRCH, Errno::EPERM
            nil
          end
          Child.untrack(self)
          @lock.synchronize do
            @status = st
            @exited.broadcast
          end
        end
      end
    end

    at_exit { Child.kill_all }

    # Free TCP ports on 127.0.0.1 (bound to port 0, then released): HEALTH_PORT for
    # components that give none, so that two runs on one machine never collide.
    module Ports
      module_function

      def free
        server = TCPServer.new("127.0.0.1", 0)
        server.addr[1]
      ensure
        server&.close
      end
    end
  end
end
