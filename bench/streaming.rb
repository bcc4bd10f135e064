# frozen_string_literal: true

# Server streaming and client streaming of 1 KiB flowctl.v1 Events: this gem vs the official
# grpc gem, clients and servers, in one run.
#
#   ruby bench/streaming.rb                  # ~1 s per measurement, best of 2 rounds
#   BENCH_SECONDS=3 BENCH_ROUNDS=3 ruby bench/streaming.rb
#
# The services are flowctl.v1's SourceService#StreamEvents (server streaming: the request's
# params["count"] says how many Events come back) and ConsumerService#Consume (client
# streaming: the Events are counted, events_consumed answers), served by each gem in its own
# subprocess (the official gem's classes are OfficialFlowctl::V1, spec/gen/official_v1).
# Each Event has a 1 KiB payload, an id, a type, a content type and a timestamp.
# Every client calls every server (BENCH_STREAM_BATCH Events per call, default 2000), so the
# table shows each client against the same server, each server against the same client, and
# this gem end to end against the official gem end to end. Client CPU is the CPU time of
# this process per message (gRPC core's threads included); server CPU that of the server
# process (from /proc). Measurements alternate between the pairings, the best round counts.
# On a shared machine the rates swing with other load; the CPU per message is the steadier
# measure of what each side costs.

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
$LOAD_PATH.unshift File.expand_path("../spec/gen/official_v1", __dir__)
require "flowctl"
require "grpc"
require "official_flowctl/v1/source_services_pb"
require "official_flowctl/v1/consumer_services_pb"
require_relative "support"
require "etc"

SECONDS = Float(ENV.fetch("BENCH_SECONDS", "1"))
ROUNDS = Integer(ENV.fetch("BENCH_ROUNDS", "2"))
BATCH = Integer(ENV.fetch("BENCH_STREAM_BATCH", "2000"))
PAYLOAD = ("x" * 1024).b.freeze
OV = OfficialFlowctl::V1
FV = Flowctl::V1
STAMP = Time.at(1_700_000_000, 123_456_789, :nsec)

def event(klass, i)
  ts = klass == FV::Event ? STAMP : Google::Protobuf::Timestamp.new(seconds: STAMP.to_i, nanos: STAMP.nsec)
  klass.new(id: "evt-#{i}", type: "bench.v1", payload: PAYLOAD, content_type: "application/octet-stream", timestamp: ts)
end

# --- servers (in the subprocess) --------------------------------------------------

# The handlers of either gem, on its Event and ConsumeResponse classes.
class BenchSource
  def initialize(klass) = @event = event(klass, 0)

  def stream_events(req, _call = nil)
    e = @event
    Integer(req.params["count"]).times { yield e }
    nil
  end
end

class BenchConsumer
  def initialize(response) = @response = response

  def consume(events, _call = nil)
    n = 0
    events.each { n += 1 }
    @response.new(events_consumed: n)
  end
end

def serve(kind)
  if kind == "flowctl"
    server = Flowctl::Server.new(port: 0, tls: false, pool_size: 8)
    server.handle(FV::SourceService, BenchSource.new(FV::Event))
    server.handle(FV::ConsumerService, BenchConsumer.new(FV::ConsumeResponse))
    [server.start, -> { server.stop(grace: 1) }]
  else
    source = BenchSource.new(OV::Event)
    consumer = BenchConsumer.new(OV::ConsumeResponse)
    src = Class.new(OV::SourceService::Service) do
      define_method(:stream_events) { |req, call| Enumerator.new { |y| source.stream_events(req, call) { |e| y << e } } }
    end
    con = Class.new(OV::ConsumerService::Service) { define_method(:consume) { |call| consumer.consume(call.each_remote_read) } }
    server = GRPC::RpcServer.new(pool_size: 8)
    port = server.add_http2_port("127.0.0.1:0", :this_port_is_insecure)
    server.handle(src.new)
    server.handle(con.new)
    Thread.new { server.run }
    server.wait_till_running
    [port, -> { server.stop }]
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
  source = FV::SourceClient.new(target, tls: false)
  consumer = FV::ConsumerClient.new(target, tls: false)
  osource = OV::SourceService::Stub.new(target, :this_channel_is_insecure)
  oconsumer = OV::ConsumerService::Stub.new(target, :this_channel_is_insecure)
  freq = FV::StreamRequest.new(params: {"count" => BATCH.to_s})
  oreq = OV::StreamRequest.new(params: {"count" => BATCH.to_s})
  fevents = Array.new(BATCH) { |i| event(FV::Event, i) }
  oevents = Array.new(BATCH) { |i| event(OV::Event, i) }
  check = ->(n) { n == BATCH ? n : raise("got #{n} of #{BATCH} messages") }
  {
    %i[flowctl server_stream] => -> { n = 0; source.stream_events(freq) { n += 1 }; check.(n) },
    %i[grpc server_stream] => -> { n = 0; osource.stream_events(oreq).each { n += 1 }; check.(n) },
    %i[flowctl client_stream] => -> { check.(consumer.consume(fevents).events_consumed) },
    %i[grpc client_stream] => -> { check.(oconsumer.consume(oevents).events_consumed) }
  }
end

puts "flowctl #{Flowctl::VERSION} vs grpc #{GRPC::VERSION}: flowctl.v1 Events of 1 KiB, #{BATCH} per call; #{SECONDS} s per " \
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
  puts "\n#{shape == :server_stream ? 'Server streaming: StreamEvents' : 'Client streaming: Consume'} (messages/s; CPU us per message)"
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
