# frozen_string_literal: true

# RSS of a client process over many unary calls (and streams): it must stay flat.
#
#   ruby bench/rpc_memory.rb                       # 100_000 calls after the first 10_000
#   FLOWCTL_BENCH_CALLS=1000000 ruby bench/rpc_memory.rb
#
# Target: RSS after one million unary calls within 5 MB of RSS after the first ten
# thousand. Server: the official grpc gem server in a subprocess.

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"
require_relative "../spec/support/official_server"

$stdout.sync = true
CALLS = Integer(ENV.fetch("FLOWCTL_BENCH_CALLS", "100000"))
WARMUP = 10_000

def rss_kb = File.read("/proc/self/status")[/^VmRSS:\s+(\d+)/, 1].to_i

def settle
  GC.start(full_mark: true, immediate_sweep: true)
  GC.compact if GC.respond_to?(:compact)
  rss_kb
end

server = OfficialServer.new(subprocess: true, pool_size: 8)
port = server.start(handler_for_controlplane: "OfficialServer::EchoControlPlane",
                    handler_for_processor: "OfficialServer::EchoProcessor")
client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false, headers: {"x-bench" => "memory"})
pc = Flowctl::Processor::Client.new("127.0.0.1:#{port}", tls: false)
beat = Flowctl::ControlPlane::ProcessorHeartbeatRequest.new(processor_id: "mem", timestamp: Time.now,
                                                            metrics: {"cpu" => 0.5}, status: "HEALTHY")
msgs = Array.new(10) { Flowctl::Processor::DataMessage.new(payload: "x" * 1024) }

# every path that allocates: plain calls, per-call headers, errors, streams
work = lambda do |i|
  client.processor_heartbeat(beat, headers: {"x-i" => i.to_s}) if (i % 10).zero?
  client.processor_heartbeat(beat)
  pc.process(msgs) { |_r| nil } if (i % 1000).zero?
  begin
    client.register_processor(processor_id: "e", timeout: 0) if (i % 1000).zero?
  rescue Flowctl::DeadlineExceeded
    nil
  end
end

t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
WARMUP.times(&work)
base = settle
puts format("after %d calls: RSS %.1f MB", WARMUP, base / 1024.0)
step = [CALLS / 5, 1].max
done = 0
while done < CALLS
  n = [step, CALLS - done].min
  n.times { |i| work.call(done + i) }
  done += n
  puts format("after %d more calls: RSS %.1f MB (%+.2f MB)", done, (r = settle) / 1024.0, (r - base) / 1024.0)
end
grow = (settle - base) / 1024.0
elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
puts format("growth over %d calls: %+.2f MB (target: within 5 MB) %s; %.0f calls/s", CALLS, grow,
            grow.abs <= 5 ? "OK" : "FAIL", (CALLS + WARMUP) / elapsed)
client.close
pc.close
server.stop
exit(grow.abs <= 5 ? 0 : 1)
