# frozen_string_literal: true

# Long run: does the gem keep its memory flat over many calls, streamed messages and
# client/server lifecycles? Prints the RSS of this process before and after each phase
# and fails (exit 1) when a phase grows it by more than LONGRUN_MAX_GROWTH_MB.
#
#   ruby bench/longrun.rb                   # CI sizes (a few seconds per phase)
#   LONGRUN_FULL=1 ruby bench/longrun.rb    # 1M unary calls, 100k streamed messages,
#                                           # 10k client and 10k server creations/closes,
#                                           # 1M events through a relayed pipeline
#   LONGRUN_UNARY=... LONGRUN_STREAM=... LONGRUN_CLIENTS=... LONGRUN_SERVERS=...
#   LONGRUN_PIPELINE=... override one size
#
# The peer is a server in another process (the official grpc gem's, spec/support/
# official_server.rb), so that only the gem's client side is measured here; the server
# phase starts and stops Flowctl::Server in this process (skipped while there is none), and
# the pipeline phase runs flowctl-pipeline's Router (its relays and pending lists) over
# flowctl.v1 components served by a Flowctl::Server in this process.
# RSS is read after GC.start, once after a warm-up (the first tenth of a phase: gRPC's
# and Ruby's caches and arenas fill up) and again at the end.
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"
require_relative "../spec/support/official_server"

module Longrun
  FULL = ENV["LONGRUN_FULL"] == "1"
  SIZES = {
    unary: Integer(ENV.fetch("LONGRUN_UNARY", FULL ? 1_000_000 : 20_000)),
    stream: Integer(ENV.fetch("LONGRUN_STREAM", FULL ? 100_000 : 20_000)),
    clients: Integer(ENV.fetch("LONGRUN_CLIENTS", FULL ? 10_000 : 500)),
    servers: Integer(ENV.fetch("LONGRUN_SERVERS", FULL ? 10_000 : 300)),
    pipeline: Integer(ENV.fetch("LONGRUN_PIPELINE", FULL ? 1_000_000 : 100_000))
  }.freeze
  MAX_GROWTH_MB = Float(ENV.fetch("LONGRUN_MAX_GROWTH_MB", "16"))

  module_function

  def rss_mb
    GC.start
    File.read("/proc/self/status")[/^VmRSS:\s+(\d+) kB/, 1].to_i / 1024.0
  end

  # Runs n iterations of the block, measuring RSS after the first tenth and at the end.
  def phase(name, n)
    return puts(format("%-34s skipped (%s)", name, n)) unless n.is_a?(Integer) && n.positive?

    warm = [n / 10, 1].max
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    warm.times { |i| yield i }
    before = rss_mb
    (warm...n).each { |i| yield i }
    after = rss_mb
    secs = Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
    growth = after - before
    @results << [name, growth]
    puts format("%-34s %9d in %6.1fs  RSS %7.1f MB -> %7.1f MB  (%+.1f MB)%s", name, n, secs, before, after, growth,
                growth > MAX_GROWTH_MB ? "  GROWS" : "")
  end

  def run
    $stdout.sync = true
    @results = []
    server = OfficialServer.new(subprocess: true)
    port = server.start(handler_for_controlplane: "OfficialServer::EchoControlPlane",
                        handler_for_processor: "OfficialServer::EchoProcessor")
    target = "127.0.0.1:#{port}"
    puts "longrun: ruby #{RUBY_VERSION}, flowctl #{Flowctl::VERSION}, peer #{target} (official grpc, own process)"
    puts format("%-34s RSS %.1f MB", "start", rss_mb)

    cp = Flowctl::ControlPlane::Client.new(target, tls: false)
    phase("unary calls (register_processor)", SIZES[:unary]) do |i|
      r = cp.register_processor(processor_id: "p#{i % 100}", endpoint: "127.0.0.1:1", metadata: {"k" => "v"})
      raise "unexpected reply #{r.inspect}" unless r.success
    end
    cp.close

    pr = Flowctl::Processor::Client.new(target, tls: false)
    msg = Flowctl::Processor::DataMessage.new(payload: "x" * 256, metadata: {"seq" => "0"})
    per_stream = 1000
    streams = SIZES[:stream] / per_stream
    phase("streamed messages (x#{per_stream}/stream)", streams) do
      call = pr.process_stream
      per_stream.times do
        call.write(msg)
        call.read or raise "stream ended early"
      end
      call.close_write
      raise "reply after close_write" if call.read
    end
    pr.close

    phase("client creations + 1 call + close", SIZES[:clients]) do |i|
      c = Flowctl::ControlPlane::Client.new(target, tls: false)
      c.processor_heartbeat(processor_id: "p#{i}", status: "HEALTHY", metrics: {"cpu" => 0.5})
      c.close
    end

    server_phase
    pipeline_phase
    server.stop
    grown = @results.select { |_, g| g > MAX_GROWTH_MB }
    abort "longrun: RSS grew by more than #{MAX_GROWTH_MB} MB in: #{grown.map(&:first).join(', ')}" if grown.any?
    puts "longrun: RSS flat (every phase within #{MAX_GROWTH_MB} MB)"
  end

  # Flowctl::Server (in this process): start, one call from a client, stop.
  def server_phase
    unless defined?(Flowctl::Server) && Flowctl::Server.instance_method(:start)
      return phase("server creations + 1 call + stop", "no Flowctl::Server yet") { nil }
    end

    handler = Class.new do
      def register_processor(req, _call) = Flowctl::ControlPlane::RegisterProcessorResponse.new(processor_id: req.processor_id, success: true)
    end.new
    phase("server creations + 1 call + stop", SIZES[:servers]) do
      s = Flowctl::Server.new(host: "127.0.0.1", port: 0)
      s.handle(Flowctl::ControlPlane::Service, handler)
      port = s.start
      c = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false)
      c.register_processor(processor_id: "p").success or raise "server did not answer"
      c.close
      s.stop(grace: 1)
    end
  end
end

module Longrun
  # The components of the pipeline phase: a source of 1 KiB events, a processor that
  # answers each, a consumer that counts.
  class PipelineComponents
    PAYLOAD = ("x" * 1024).b.freeze

    def initialize(per_run) = @per_run = per_run

    def stream_events(_req, _call)
      @per_run.times { |i| yield Flowctl::V1::Event.new(id: i.to_s, type: "raw", payload: PAYLOAD) }
      nil
    end

    def process(events, _call) = events.lazy.map { |e| Flowctl::V1::Event.new(id: e.id, type: "done", payload: e.payload) }

    def consume(events, _call)
      n = 0
      events.each { n += 1 }
      Flowctl::V1::ConsumeResponse.new(events_consumed: n)
    end
  end

  module_function

  # Source -> processor -> consumer through the Router (its relays), run after run.
  def pipeline_phase
    require "flowctl/pipeline"
    per_run = 500 # runs, more than events, are what could leak (threads, links, lists)
    s = Flowctl::Server.new(host: "127.0.0.1", port: 0, pool_size: 8)
    components = PipelineComponents.new(per_run)
    [Flowctl::V1::SourceService, Flowctl::V1::ProcessorService, Flowctl::V1::ConsumerService].each { |svc| s.handle(svc, components) }
    endpoint = "127.0.0.1:#{s.start}"
    definition = Flowctl::Pipeline::Definition.parse(<<~YAML, check_commands: false)
      apiVersion: flowctl/v1
      kind: Pipeline
      metadata: {name: longrun}
      spec:
        sources: [{id: src, command: [x]}]
        processors: [{id: p, command: [x], inputs: [src]}]
        sinks: [{id: sink, command: [x], inputs: [p]}]
    YAML
    hooks = Object.new
    hooks.define_singleton_method(:connect) { |c| Flowctl::Pipeline::Wire.link(c, endpoint) }
    hooks.define_singleton_method(:broken) { |_c, _e| false }
    phase("pipeline runs (x#{per_run} events, relayed)", SIZES[:pipeline] / per_run) do
      router = Flowctl::Pipeline::Router.new(definition, hooks).start
      router.wait(60) or raise "a pipeline run did not end"
      got = router.snapshot["sink"]["in"]
      raise "#{got} of #{per_run} events arrived" unless got == per_run
    end
  ensure
    s&.stop(grace: 1)
  end
end

Longrun.run if $PROGRAM_NAME == __FILE__
