# frozen_string_literal: true

# How much does heartbeating at 100 Hz cost a CPU-bound Ruby program?
#
#   ruby -Ilib bench/heartbeat.rb [cpu_seconds_per_run=0.4] [rounds=3]
#
# One run of a fixed CPU-bound Ruby loop alone, with a Flowctl::Heartbeat beating at
# 100 Hz (native thread, no GVL), and with a plain Ruby thread doing the same beats
# through the official grpc gem's stub. Rounds alternate the three so that load from
# other processes hits all of them; the best (shortest) run of each is reported, as the
# one least disturbed by other processes on the machine. The control plane
# is an official-grpc-gem server in a subprocess (its CPU is not counted here).
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
$LOAD_PATH.unshift File.expand_path("../spec/gen", __dir__)
require "flowctl"
require "grpc"
require "controlplane/controlplane_services_pb"
require "rbconfig"

SECONDS = Float(ARGV[0] || 0.4)
ROUNDS = Integer(ARGV[1] || 3)
HZ = 100
OCP = Obsrvr::Flow::Controlplane

SERVER = <<~'RUBY'
  $LOAD_PATH.unshift(ARGV[0])
  require "grpc"
  require "controlplane/controlplane_services_pb"
  CP = Obsrvr::Flow::Controlplane
  class Counter < CP::ControlPlane::Service
    def processor_heartbeat(_req, _call) = CP::ProcessorHeartbeatResponse.new(success: true)
    def register_processor(req, _call) = CP::RegisterProcessorResponse.new(processor_id: req.processor_id, success: true)
  end
  s = GRPC::RpcServer.new(pool_size: 4)
  port = s.add_http2_port("127.0.0.1:0", :this_port_is_insecure)
  s.handle(Counter.new)
  Thread.new { s.wait_till_running(10); $stdout.puts port; $stdout.flush }
  s.run
RUBY

def start_server
  r, w = IO.pipe
  pid = Process.spawn(RbConfig.ruby, "-e", SERVER, File.expand_path("../spec/gen", __dir__), out: w, err: File::NULL)
  w.close
  port = Integer(r.gets)
  [pid, port]
end

def fib(n) = n < 2 ? n : fib(n - 1) + fib(n - 2)

Run = Struct.new(:wall, :cpu)

# the CPU-bound work: a fixed number of fib(20) calls; calibrated to about SECONDS alone.
# wall: elapsed time; cpu: CPU time of the loop's own thread.
def work(n)
  t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  c = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID)
  n.times { fib(20) }
  Run.new(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t, Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) - c)
end

def calibrate
  n = 10
  n *= 2 while work(n).cpu < SECONDS / 4
  (n * SECONDS / work(n).cpu).ceil
end

def with_flowctl(port, n)
  ch = Flowctl::Native::Channel.new("127.0.0.1:#{port}", false, {})
  hb = Flowctl::Heartbeat.new(ch, :processor, id: "bench", interval: 1.0 / HZ, metrics: {"x" => 1})
  sleep 0.1 # connected and beating
  sent = hb.stats[:sent]
  t = work(n)
  beats = hb.stats[:sent] - sent
  hb.stop(0)
  ch.close
  [t, beats / t.wall]
end

def with_official(port, n)
  stub = OCP::ControlPlane::Stub.new("127.0.0.1:#{port}", :this_channel_is_insecure)
  beats = 0
  stop = false
  thread = Thread.new do
    next_at = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    until stop
      now = Time.now
      req = OCP::ProcessorHeartbeatRequest.new(
        processor_id: "bench", status: "HEALTHY", metrics: {"x" => 1.0},
        timestamp: Google::Protobuf::Timestamp.new(seconds: now.to_i, nanos: now.nsec)
      )
      stub.processor_heartbeat(req, deadline: Time.now + 1)
      beats += 1
      next_at += 1.0 / HZ
      delay = next_at - Process.clock_gettime(Process::CLOCK_MONOTONIC)
      delay.positive? ? sleep(delay) : next_at = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
  sleep 0.1
  start = beats
  t = work(n)
  done = beats - start
  stop = true
  thread.join
  [t, done / t.wall]
end

pid, port = start_server
begin
  n = calibrate
  runs = {alone: [], flowctl: [], official: []}
  rates = {flowctl: [], official: []}
  ROUNDS.times do
    sleep 0.1 # every variant starts after the same pause (the scheduler favours a thread that slept)
    runs[:alone] << work(n)
    t, r = with_flowctl(port, n)
    runs[:flowctl] << t
    rates[:flowctl] << r
    t, r = with_official(port, n)
    runs[:official] << t
    rates[:official] << r
  end
  best = ->(a, m) { a.map(&m).min }
  alone_wall = best.(runs[:alone], :wall)
  alone_cpu = best.(runs[:alone], :cpu)
  puts "CPU-bound loop (#{n} x fib(20)), best of #{ROUNDS} rounds, heartbeats at #{HZ} Hz " \
       "(#{RUBY_DESCRIPTION.split(' [').first}, #{`nproc`.strip} cores, load #{File.read('/proc/loadavg').split[0]})"
  printf "  %-42s %8s %7s %8s %7s %9s\n", "", "wall s", "speed", "cpu s", "speed", "beats/s"
  printf "  %-42s %8.3f %6.3fx %8.3f %6.3fx %9s\n", "alone", alone_wall, 1.0, alone_cpu, 1.0, "-"
  {flowctl: "with Flowctl::Heartbeat (native thread)", official: "with a Ruby thread + official grpc stub"}.each do |k, label|
    w = best.(runs[k], :wall)
    c = best.(runs[k], :cpu)
    printf "  %-42s %8.3f %6.3fx %8.3f %6.3fx %9.0f\n", label, w, alone_wall / w, c, alone_cpu / c, rates[k].sum / ROUNDS
  end
  puts "  speed = alone / variant; wall: elapsed time of the loop; cpu: CPU time of the loop's thread"
  puts "  (on a machine shared with other processes the wall figures move with their load)"
ensure
  Process.kill(:KILL, pid)
  Process.wait(pid)
end
