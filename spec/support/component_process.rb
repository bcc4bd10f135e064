# frozen_string_literal: true

require "rbconfig"
require "socket"
require "tempfile"

# A component in a child process, started with an environment exactly like `flowctl run`
# gives one (FLOWCTL_V1.md): its stderr goes to a file the spec can read and wait on.
#
#   proc = ComponentProcess.start(source_code, id: "sq", control_plane: "127.0.0.1:#{port}")
#   proc.wait_log(/registered/)
#   proc.term  # => Process::Status
class ComponentProcess
  attr_reader :pid, :health_port, :env

  def self.free_port
    s = TCPServer.new("127.0.0.1", 0)
    s.local_address.ip_port
  ensure
    s&.close
  end

  # The variables `flowctl run` injects for the component with YAML id `id`.
  def self.flowctl_run_env(id:, control_plane:, health_port: free_port, interval: "10s")
    { "ENABLE_FLOWCTL" => "true", "FLOWCTL_ENDPOINT" => control_plane, "FLOWCTL_HEARTBEAT_INTERVAL" => interval,
      "FLOWCTL_SERVICE_ID" => id, "FLOWCTL_COMPONENT_ID" => id, "HEALTH_PORT" => health_port.to_s }
  end

  def self.start(code, env = {})
    new(code, env).tap(&:start)
  end

  def initialize(code, env)
    @code = "$LOAD_PATH.unshift(#{FLOWCTL_LIB.inspect})\nrequire \"flowctl\"\n$stdout.sync = true\n#{code}"
    @env = env
    @health_port = env["HEALTH_PORT"]&.to_i
  end

  def start
    @log = Tempfile.new(["component", ".log"])
    @script = Tempfile.new(["component", ".rb"])
    @script.write(@code)
    @script.flush
    @out_r, out_w = IO.pipe
    @pid = Process.spawn(@env, RbConfig.ruby, @script.path, out: out_w, err: @log.path, unsetenv_others: false)
    out_w.close
    self
  end

  # What the component printed on stdout so far (non-blocking).
  def stdout
    @stdout ||= +""
    loop do
      chunk = @out_r.read_nonblock(65_536, exception: false)
      break unless chunk.is_a?(String)

      @stdout << chunk
    end
    @stdout
  end

  def log = File.read(@log.path)

  # Waits until the log matches; the MatchData, or raises with the log after timeout seconds.
  def wait_log(pattern, timeout: 10)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      m = pattern.match(log)
      return m if m
      raise "component exited before logging #{pattern.inspect}:\n#{log}" if exited?
      raise "no #{pattern.inspect} in #{timeout}s:\n#{log}" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.05
    end
  end

  # The gRPC port, from the "serving on 127.0.0.1:<port>" line.
  def port = Integer(wait_log(/serving on 127\.0\.0\.1:(\d+)/)[1])

  def exited?
    return true if @status

    _, @status = Process.waitpid2(@pid, Process::WNOHANG)
    !@status.nil?
  end

  # Sends signal and waits for the exit (KILL after timeout): the Process::Status.
  def term(signal = :TERM, timeout: 15)
    return @status if @status

    Process.kill(signal, @pid)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    until exited?
      if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
        Process.kill(:KILL, @pid)
        Process.wait(@pid)
        raise "component did not exit within #{timeout}s of #{signal}:\n#{log}"
      end
      sleep 0.05
    end
    @status
  end

  def kill
    Process.kill(:KILL, @pid) unless exited?
    Process.wait(@pid) unless @status
  rescue Errno::ESRCH, Errno::ECHILD
    nil
  ensure
    @script&.close!
  end
end
