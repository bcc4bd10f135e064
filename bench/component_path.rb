# frozen_string_literal: true

# The Ruby cost of Flowctl::Component's per-event path, without the wire: each kind's handler
# (Source/Processor/Consumer::Handler, with its runtime: streams, metrics, failure handling)
# driven by in-memory requests and a call that only encodes, against a bare loop doing the same
# decode / new Event / encode. Prints CPU µs per event and the overhead of the component layer
# (bench/pipeline.rb measures the whole pipeline over gRPC).
#
#   ruby bench/component_path.rb        # BENCH_EVENTS (default 100000), BENCH_ROUNDS (3; the best counts)
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"
require "logger"
require_relative "pipeline/bench_components"

module ComponentPathBench
  EVENTS = Integer(ENV.fetch("BENCH_EVENTS", "100000"))
  ROUNDS = Integer(ENV.fetch("BENCH_ROUNDS", "3"))
  WIRE = Array.new(1000) { |i| Flowctl::V1::Event.new(id: i.to_s, type: "raw", payload: PAYLOAD).to_proto }.freeze

  # What Flowctl::Server::Requests does, from memory: decode the next message.
  class Requests
    def initialize(n) = (@n = n)

    def read
      return nil if @n.zero?

      @n -= 1
      Flowctl::V1::Event.decode(WIRE[@n % 1000])
    end
  end

  # A call that encodes each reply, as Flowctl::Server::Call#write does before the wire.
  class Call
    def write(reply) = reply.to_proto
  end

  module_function

  def cpu = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)

  def per_event
    best = Array.new(ROUNDS) do
      t0 = cpu
      yield
      (cpu - t0) / EVENTS * 1e6
    end
    best.min
  end

  def bare(kind)
    call = Call.new
    case kind
    when :processor
      per_event do
        req = Requests.new(EVENTS)
        while (e = req.read)
          call.write(Flowctl::V1::Event.new(id: e.id, type: "processed", payload: e.payload))
        end
      end
    when :consumer
      per_event do
        req = Requests.new(EVENTS)
        nil while req.read
      end
    else per_event { BenchSource.new.each_event(Flowctl::V1::StreamRequest.new(params: { "count" => EVENTS.to_s })) { |e| call.write(e) } }
    end
  end

  def component(kind, klass)
    rt = klass.start(port: 0, control_plane: false, env: {}, logger: Logger.new(nil))
    handler = klass::Handler.new(rt)
    case kind
    when :processor then per_event { handler.process(Requests.new(EVENTS), Call.new) }
    when :consumer then per_event { handler.consume(Requests.new(EVENTS), nil) }
    else per_event { handler.stream_events(Flowctl::V1::StreamRequest.new(params: { "count" => EVENTS.to_s }), Call.new) }
    end
  ensure
    rt&.stop(grace: 0)
  end

  def main
    puts "bench/component_path.rb: #{EVENTS} events of 1 KiB per kind, best of #{ROUNDS} (CPU µs/event)"
    puts format("%-12s %10s %10s %10s", "", "bare", "component", "overhead")
    { processor: BenchProcessor, consumer: BenchConsumer, source: BenchSource }.each do |kind, klass|
      b = bare(kind)
      c = component(kind, klass)
      puts format("%-12s %10.2f %10.2f %10.2f", kind, b, c, c - b)
    end
  end
end

ComponentPathBench.main if $PROGRAM_NAME == __FILE__
