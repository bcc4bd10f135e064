# frozen_string_literal: true

# Server streaming and client streaming of 1 KiB messages: this gem vs the official grpc gem,
# clients and servers, in one run.
#
#   ruby bench/streaming.rb                  # ~1 s per measurement, best of 2 rounds
#   BENCH_SECONDS=3 BENCH_ROUNDS=3 ruby bench/streaming.rb
#
# The service is spec/support/shapes.rb's (flowctl.test.Shapes on the seed's DataMessage, one
# RPC per call shape), served by each gem in its own subprocess:
#   ServerStream: the request's metadata "count" says how many replies (each a 1 KiB payload);
#   ClientStream: counts the requests (1 KiB payloads each) and answers with the count.
# Every client calls every server (BENCH_STREAM_BATCH messages per call, default 2000), so the
# table shows each client against the same server, each server against the same client, and
# this gem end to end against the official gem end to end. Client CPU is the CPU time of
# this process per message (gRPC core's threads included); server CPU that of the server
# process (from /proc). Measurements alternate between the pairings, the best round counts.
# On a shared machine the rates swing with other load; the CPU per message is the steadier
# measure of what each side costs.

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"
require_relative "../spec/support/official"
require_relative "support"
require_relative "../spec/support/shapes"
require "etc"
Official.load!

SECONDS = Float(ENV.fetch("BENCH_SECONDS", "1"))
ROUNDS = Integer(ENV.fetch("BENCH_ROUNDS", "2"))
BATCH = Integer(ENV.fetch("BENCH_STREAM_BATCH", "2000"))
PAYLOAD = ("x" * 1024).b.freeze
OM = Obsrvr::Flow::Processor::DataMessage
FM = Flowctl::Processor::DataMessage

# --- servers (in the subprocess) --------------------------------------------------

# The handler of either gem: klass is its DataMessage class.
class BenchShapes
  def initialize(klass)
    @klass = klass
    @reply = klass.new(payload: PAYLOAD)
  end

  def server_stream(req, _call = nil)
    reply = @reply
    Integer(req.metadata["count"]).times { yield reply }
    nil
  end

  def client_stream(reqs, _call = nil)
    n = 0
    reqs.each { n += 1 }
    @klass.new(metadata: {"count" => n.to_s})
  end

  # (not measured here: bench/rpc.rb and bench/server.rb measure bidi; a reference for a quick look)
  def bidi(reqs, _call = nil) = reqs.lazy.map { |r| r }
end

def serve(kind)
  if kind == "flowctl"
    server = Flowctl::Server.new(port: 0, tls: false, pool_size: 8)
    server.handle(Shapes.service, BenchShapes.new(FM))
    [server.start, -> { server.stop(grace: 1) }]
  else
    server = Shapes::OfficialServer.new(BenchShapes.new(OM), pool_size: 8)
    [server.start, -> { server.stop }]
  end
end

Bench.serve_until_stdin_closes(*serve(ARGV[1])) if ARGV[0] == "--serve"

# --- driver -------------------------------------------------------------------------

def clock = Process.clock_gettime(Process::CLOCK_MONOTONIC)
def cpu = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)

# user + system CPU seconds of a process, from /proc
def proc_cpu(pid)
  fields = File.read("/proc/#{pid}/stat").split(") ").last.split
  (Integer(fields[11]) + Integer(fields[12])).to_f / Etc.sysconf(Etc::SC_CLK_TCK)
end

Server = Struct.new(:kind, :port, :io)

def start_server(kind)
  io = IO.popen([RbConfig.ruby, __FILE__, "--serve", kind], "r+")
  Server.new(kind, Integer(io.gets), io)
end

def stop_server(server)
  server.io.close_write
  Process.wait(server.io.pid)
  server.io.close
end

# [messages/s, client CPU us/message, server CPU us/message] of the block (one call of BATCH messages).
def measure(server)
  n = 0
  c0 = cpu
  s0 = proc_cpu(server.io.pid)
  t0 = clock
  n += yield while clock - t0 < SECONDS
  elapsed = clock - t0
  [n / elapsed, (cpu - c0) / n * 1e6, (proc_cpu(server.io.pid) - s0) / n * 1e6]
end

# The calls of both clients for one server: {[client, shape] => block returning messages}.
def calls(server)
  target = "127.0.0.1:#{server.port}"
  client = Shapes.client(target)
  stub = Shapes.official_stub(server.port)
  freq = FM.new(payload: "go", metadata: {"count" => BATCH.to_s})
  oreq = OM.new(payload: "go", metadata: {"count" => BATCH.to_s})
  fmsgs = Array.new(BATCH) { FM.new(payload: PAYLOAD) }
  omsgs = Array.new(BATCH) { OM.new(payload: PAYLOAD) }
  check = ->(n) { n == BATCH ? n : raise("got #{n} of #{BATCH} messages") }
  {
    %i[flowctl server_stream] => -> { n = 0; client.server_stream(freq) { n += 1 }; check.(n) },
    %i[grpc server_stream] => -> { n = 0; stub.server_stream(oreq).each { n += 1 }; check.(n) },
    %i[flowctl client_stream] => -> { check.(Integer(client.client_stream(fmsgs).metadata["count"])) },
    %i[grpc client_stream] => -> { check.(Integer(stub.client_stream(omsgs).metadata["count"])) }
  }
end

puts "flowctl #{Flowctl::VERSION} vs grpc #{GRPC::VERSION}: 1 KiB messages, #{BATCH} per call; #{SECONDS} s per " \
     "measurement, best of #{ROUNDS}; ruby #{RUBY_VERSION}, #{Etc.nprocessors} CPUs, load " \
     "#{File.read('/proc/loadavg').split.first(3).join(' ')}"

servers = %w[flowctl grpc].to_h { |kind| [kind.to_sym, start_server(kind == "grpc" ? "official" : kind)] }
results = Hash.new { |h, k| h[k] = [0.0] }
begin
  blocks = servers.to_h { |kind, server| [kind, calls(server)] }
  blocks.each_value { |b| b.each_value { |blk| 3.times { blk.call } } } # connections, code paths
  ROUNDS.times do
    %i[server_stream client_stream].each do |shape|
      servers.each do |skind, server|
        %i[flowctl grpc].each do |ckind|
          r = measure(server, &blocks[skind][[ckind, shape]])
          key = [shape, ckind, skind]
          results[key] = r if r[0] > results[key][0]
        end
      end
    end
  end
ensure
  servers.each_value { |s| stop_server(s) }
end

%i[server_stream client_stream].each do |shape|
  puts "\n#{shape == :server_stream ? 'Server streaming' : 'Client streaming'} (messages/s; CPU us per message)"
  printf("  %-8s %-8s %10s %12s %12s\n", "client", "server", "msgs/s", "client CPU", "server CPU")
  %i[flowctl grpc].each do |ckind|
    %i[flowctl grpc].each do |skind|
      rate, ccpu, scpu = results[[shape, ckind, skind]]
      printf("  %-8s %-8s %10.0f %12.1f %12.1f\n", ckind, skind, rate, ccpu, scpu)
    end
  end
  r = ->(c, s) { results[[shape, c, s]][0] }
  printf("  end to end, flowctl client+server / grpc client+server: %5.2fx\n", r.(:flowctl, :flowctl) / r.(:grpc, :grpc))
  printf("  clients against the grpc server, flowctl / grpc:         %5.2fx\n", r.(:flowctl, :grpc) / r.(:grpc, :grpc))
  printf("  clients against the flowctl server, flowctl / grpc:      %5.2fx\n", r.(:flowctl, :flowctl) / r.(:grpc, :flowctl))
  printf("  servers for the grpc client, flowctl / grpc:             %5.2fx\n", r.(:grpc, :flowctl) / r.(:grpc, :grpc))
  printf("  servers for the flowctl client, flowctl / grpc:          %5.2fx\n", r.(:flowctl, :flowctl) / r.(:flowctl, :grpc))
  cpu = ->(c, s) { results[[shape, c, s]][1] + results[[shape, c, s]][2] }
  printf("  CPU per message (client + server), grpc end to end / flowctl end to end: %5.2fx less\n",
         cpu.(:grpc, :grpc) / cpu.(:flowctl, :flowctl))
end
