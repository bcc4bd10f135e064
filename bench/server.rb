# frozen_string_literal: true

# Server throughput: this gem's Flowctl::Server vs a GRPC::RpcServer built with the official
# grpc gem, serving the same handlers, each in its own subprocess, driven by the same client
# in one run: this gem's client when it is there (it saturates later than the official
# one, so the servers are what is measured), else the official grpc gem's stub;
# FLOWCTL_BENCH_CLIENT=official|flowctl picks one.
#
#   ruby bench/server.rb [seconds_per_case] [client_threads]      (ROUNDS=2: best of alternating rounds)
#
# Prints unary calls/s and bidi messages/s for both servers and the ratios, and the CPU time
# (user + system, from /proc) each server process and the client spent per call or message.
# On a small shared machine the rates swing with other load and stop growing once the client
# saturates; the server CPU per call is the steadier measure of what each server costs.
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require_relative "../spec/support/official"
require_relative "support"
Official.load!
require "etc"

CP = Obsrvr::Flow::Controlplane
PR = Obsrvr::Flow::Processor

# --- servers (run in the subprocess) ------------------------------------------

def serve_flowctl
  require "flowctl"
  cp = Class.new do
    def register_processor(req, _call)
      Flowctl::ControlPlane::RegisterProcessorResponse.new(processor_id: req.processor_id, success: true)
    end
  end
  pr = Class.new do
    def process(requests, _call)
      requests.each { |m| yield m }
    end
  end
  server = Flowctl::Server.new(port: 0, tls: false, pool_size: 16)
  server.handle(Flowctl::ControlPlane::Service, cp.new)
  server.handle(Flowctl::Processor::Service, pr.new)
  port = server.start
  [port, -> { server.stop(grace: 1) }]
end

def serve_official
  cp = Class.new(CP::ControlPlane::Service) do
    def register_processor(req, _call)
      CP::RegisterProcessorResponse.new(processor_id: req.processor_id, success: true)
    end
  end
  pr = Class.new(PR::ProcessorService::Service) do
    def process(requests, _call)
      requests.lazy.map { |m| m }
    end
  end
  server = GRPC::RpcServer.new(pool_size: 16, max_waiting_requests: 10_000)
  port = server.add_http2_port("127.0.0.1:0", :this_port_is_insecure)
  server.handle(cp)
  server.handle(pr)
  Thread.new { server.run }
  server.wait_till_running
  [port, -> { server.stop }]
end

Bench.serve_until_stdin_closes(*(ARGV[1] == "flowctl" ? serve_flowctl : serve_official)) if ARGV[0] == "--serve"

# --- driver -------------------------------------------------------------------

SECONDS = Float(ARGV[0] || 3)
ROUNDS = Integer(ENV.fetch("ROUNDS", 2))
THREADS = Integer(ARGV[1] || 4)

def start_server(kind)
  io = IO.popen([RbConfig.ruby, __FILE__, "--serve", kind], "r+")
  port = Integer(io.gets)
  [io, "127.0.0.1:#{port}"]
end

def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

CLIENT = ENV.fetch("FLOWCTL_BENCH_CLIENT") do
  require "flowctl"
  defined?(Flowctl::Processor::Client) && Flowctl::Processor::Client.method_defined?(:process) ? "flowctl" : "official"
rescue LoadError
  "official"
end
require "flowctl" if CLIENT == "flowctl"

def unary_stub(target)
  return CP::ControlPlane::Stub.new(target, :this_channel_is_insecure) if CLIENT == "official"

  Flowctl::ControlPlane::Client.new(target, tls: false)
end

def unary_request
  fields = { processor_id: "bench", endpoint: "127.0.0.1:1", metadata: { "k" => "v" } }
  CLIENT == "official" ? CP::RegisterProcessorRequest.new(**fields) : Flowctl::ControlPlane::RegisterProcessorRequest.new(**fields)
end

def bidi_message
  fields = { payload: "x" * 256, metadata: { "type" => "bench" } }
  CLIENT == "official" ? PR::DataMessage.new(**fields) : Flowctl::Processor::DataMessage.new(**fields)
end

def bidi_stream(target, requests, &block)
  if CLIENT == "official"
    PR::ProcessorService::Stub.new(target, :this_channel_is_insecure).process(requests).each(&block)
  else
    Flowctl::Processor::Client.new(target, tls: false).process(requests, &block)
  end
end

ERRORS = Queue.new

def unary_rate(target)
  stub = unary_stub(target)
  req = unary_request
  stub.register_processor(req) # warm up the connection
  stop_at = now + SECONDS
  t0 = now
  counts = Array.new(THREADS) do
    Thread.new do
      n = 0
      while now < stop_at
        begin
          stub.register_processor(req)
          n += 1
        rescue StandardError => e # counted and reported, not fatal: a busy server may refuse calls
          ERRORS << e.class
        end
      end
      n
    end
  end.map(&:value)
  [counts.sum / (now - t0), counts.sum]
end

def bidi_rate(target)
  msg = bidi_message
  stop_at = now + SECONDS
  t0 = now
  counts = Array.new(THREADS) do
    Thread.new do
      sent = Enumerator.new { |y| y << msg while now < stop_at }
      n = 0
      bidi_stream(target, sent) { n += 1 }
      n
    end
  end.map(&:value)
  [counts.sum / (now - t0), counts.sum]
end

# CPU seconds (user + system) the server process has used so far.
def cpu_seconds(pid)
  fields = File.read("/proc/#{pid}/stat").split(") ", 2).last.split
  (Integer(fields[11]) + Integer(fields[12])) / Float(Etc.sysconf(Etc::SC_CLK_TCK))
end

# rate and the server's CPU microseconds per call/message over the same run
def run_case(pid, target, kind)
  c0 = cpu_seconds(pid)
  d0 = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
  rate, count = send(kind, target)
  [rate, (cpu_seconds(pid) - c0) * 1e6 / count,
   (Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) - d0) * 1e6 / count]
end

def measure(kind)
  io, target = start_server(kind)
  { unary: run_case(io.pid, target, :unary_rate), bidi: run_case(io.pid, target, :bidi_rate) }
ensure
  io&.close
end

client_name = CLIENT == "official" ? "the official grpc gem's stub" : "this gem's client"
puts "bench/server.rb: #{SECONDS}s per case, best of #{ROUNDS} alternating rounds, #{THREADS} client threads, client = #{client_name} " \
     "(grpc #{Gem.loaded_specs['grpc']&.version || GRPC::VERSION}), Ruby #{RUBY_VERSION}"
def errors_of(name)
  list = []
  list << ERRORS.pop until ERRORS.empty?
  puts "#{name}: #{list.size} unary calls failed (#{list.tally.map { |k, v| "#{k} x#{v}" }.join(', ')})" if list.any?
end

# Rounds alternate the two servers; each figure is the best round (the machine is shared,
# so the best round is the one least disturbed by other work).
best = lambda do |a, b|
  a.nil? ? b : a.to_h { |k, (rate, cpu, ccpu)| [k, [[rate, b[k][0]].max, [cpu, b[k][1]].min, [ccpu, b[k][2]].min]] }
end
flowctl = official = nil
ROUNDS.times do
  flowctl = best.call(flowctl, measure("flowctl"))
  errors_of("flowctl server")
  official = best.call(official, measure("official"))
  errors_of("official server")
end
printf("%-34s %14s %14s %8s\n", "", "flowctl", "official grpc", "ratio")
[[:unary, "unary calls/s", "server CPU us per unary call"],
 [:bidi, "bidi messages/s", "server CPU us per bidi message"]].each do |key, rate_label, cpu_label|
  (f_rate, f_cpu, f_client), (o_rate, o_cpu, o_client) = flowctl[key], official[key]
  printf("%-34s %14.0f %14.0f %7.2fx\n", rate_label, f_rate, o_rate, f_rate / o_rate)
  printf("%-34s %14.1f %14.1f %7.2fx\n", cpu_label, f_cpu, o_cpu, o_cpu / f_cpu)
  printf("%-34s %14.1f %14.1f\n", "  (the client's CPU us, same unit)", f_client, o_client)
end
puts "(ratios: flowctl over official for rates, official over flowctl for CPU cost; " \
     "rates are bounded by the shared client when it saturates first)"
