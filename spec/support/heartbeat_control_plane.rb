# frozen_string_literal: true

require "json"
require "rbconfig"

# A control plane built with the OFFICIAL grpc gem, in a subprocess so that a spec can
# kill it (SIGKILL) and start it again on the same port. It reports every request it
# receives as a JSON line on its stdout; #events collects them.
#
#   cp = RecordingControlPlane.start(strict: true)   # strict: beats from unknown ids get success: false
#   cp.wait_for { |evs| evs.count { |e| e["rpc"] == "processor_heartbeat" } >= 3 }
#   cp.kill; cp.restart
class RecordingControlPlane
  SCRIPT = <<~'RUBY'
    $LOAD_PATH.unshift(ARGV[0])
    require "grpc"
    require "json"
    require "controlplane/controlplane_services_pb"
    $stdout.sync = true
    port = Integer(ARGV[1])
    strict = ARGV[2] == "strict"
    CP = Obsrvr::Flow::Controlplane

    class Recorder < CP::ControlPlane::Service
      def initialize(strict)
        @strict = strict
        @known = {}
        @mu = Mutex.new
      end

      def emit(h)
        @mu.synchronize { $stdout.puts(JSON.generate(h.merge(at: Time.now.to_f))) }
      end

      %w[processor source consumer].each do |kind|
        define_method("register_#{kind}") do |req, call|
          id = req.public_send("#{kind}_id")
          @mu.synchronize { @known[[kind, id]] = true }
          emit(rpc: "register_#{kind}", id: id, endpoint: req.endpoint, metadata: req.metadata.to_h,
               headers: call.metadata)
          CP.const_get("Register#{kind.capitalize}Response").new("#{kind}_id": id, success: true)
        end

        define_method("#{kind}_heartbeat") do |req, call|
          id = req.public_send("#{kind}_id")
          ok = !@strict || @mu.synchronize { @known.key?([kind, id]) }
          ts = req.timestamp && (req.timestamp.seconds + req.timestamp.nanos / 1e9)
          emit(rpc: "#{kind}_heartbeat", id: id, status: req.status, metrics: req.metrics.to_h, ts: ts,
               ok: ok, headers: call.metadata)
          CP.const_get("#{kind.capitalize}HeartbeatResponse").new(success: ok, message: ok ? "" : "unknown #{kind} #{id}")
        end
      end
    end

    server = GRPC::RpcServer.new(pool_size: 4)
    port = server.add_http2_port("127.0.0.1:#{port}", :this_port_is_insecure)
    server.handle(Recorder.new(strict))
    Thread.new { server.wait_till_running(10); puts JSON.generate(port: port) }
    server.run
  RUBY

  attr_reader :port

  def self.start(**opts)
    new(**opts).tap(&:start)
  end

  def initialize(strict: false, port: 0)
    @strict = strict
    @port = port
    @events = []
    @mu = Mutex.new
    @cv = ConditionVariable.new
  end

  def start
    gen = File.expand_path("../gen", __dir__)
    @out, w = IO.pipe
    script, *args = spawn_args
    @pid = Process.spawn(RbConfig.ruby, "-e", script, gen, @port.to_s, *args, out: w, err: File::NULL)
    w.close
    line = @out.gets or raise "control plane subprocess did not start"
    @port = JSON.parse(line).fetch("port")
    @started_at = Time.now
    @reader = Thread.new(@out) { |io| read_events(io) }
    self
  end

  attr_reader :started_at

  def kill
    return unless @pid

    Process.kill(:KILL, @pid)
    Process.wait(@pid)
    @pid = nil
    @reader&.join(5)
    @out&.close
  end

  alias stop kill

  def restart
    kill
    start
  end

  def events(rpc = nil)
    @mu.synchronize { rpc ? @events.select { |e| e["rpc"] == rpc.to_s } : @events.dup }
  end

  # The beat sent last (by its own timestamp): the server handles requests on several
  # threads, so a beat cancelled in flight by Heartbeat#stop can be reported after the
  # final STOPPING beat that was sent after it.
  def last_sent(rpc = nil)
    events(rpc).select { |e| e["ts"] }.max_by { |e| e["ts"] }
  end

  # Waits until the block (given the events so far) is true; false after timeout seconds.
  def wait_for(timeout = 5)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    @mu.synchronize do
      loop do
        return true if yield(@events)

        left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
        return false if left <= 0

        @cv.wait(@mu, left)
      end
    end
  end

  def count(rpc)
    events(rpc).size
  end

  private

  # The script the subprocess runs and its arguments after the gen dir and the port.
  def spawn_args
    [SCRIPT, @strict ? "strict" : "lenient"]
  end

  def read_events(io)
    io.each_line do |line|
      ev = JSON.parse(line)
      @mu.synchronize do
        @events << ev
        @cv.broadcast
      end
    end
  rescue IOError
    nil
  end
end
