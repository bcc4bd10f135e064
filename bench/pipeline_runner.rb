# frozen_string_literal: true

# The runner's own overhead: events/s through source -> processor -> consumer (three
# processes, 1 KiB events) wired by Flowctl::Pipeline::Router (bounded inboxes, event-type
# filters, counters, acknowledgements, replay buffers) against the same running components
# wired directly (StreamEvents -> Process -> Consume with two threads and nothing else).
# Both wirings run in this process, alternating, on the same components; best round kept.
#
#   ruby bench/pipeline_runner.rb      # BENCH_EVENTS (default 20000) per round, BENCH_ROUNDS (default 3)
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl/pipeline"
require "rbconfig"

module PipelineRunnerBench
  EVENTS = Integer(ENV.fetch("BENCH_EVENTS", "20000"))
  ROUNDS = Integer(ENV.fetch("BENCH_ROUNDS", "3"))
  COMPONENTS = File.join(__dir__, "pipeline_runner", "components.rb")

  YAML_TEXT = <<~YAML
    apiVersion: flowctl/v1
    kind: Pipeline
    metadata: {name: bench}
    spec:
      heartbeat_interval: 1s
      sources: [{id: src, command: [#{RbConfig.ruby}, #{COMPONENTS}, source]}]
      processors: [{id: proc, command: [#{RbConfig.ruby}, #{COMPONENTS}, processor]}]
      sinks: [{id: sink, command: [#{RbConfig.ruby}, #{COMPONENTS}, consumer], input_event_types: [processed]}]
  YAML

  module_function

  def client(name, endpoint) = Flowctl::Pipeline::Wire.client(name, endpoint)

  # StreamEvents -> Process -> Consume, one thread per direction, nothing in between.
  def direct(endpoints, n)
    src = client(:SourceClient, endpoints["src"])
    prc = client(:ProcessorClient, endpoints["proc"])
    con = client(:ConsumerClient, endpoints["sink"])
    events = src.stream_events_stream(params: { "count" => n.to_s })
    process = prc.process_stream
    consume = con.consume_stream
    feeder = Thread.new do
      events.each { |e| process.write(e) }
      process.close_write
    end
    process.each { |r| consume.write(r) }
    feeder.join
    consume.response.events_consumed
  ensure
    [src, prc, con].each { |c| c&.close }
  end

  # The same through the Router (its hooks connect to the running components).
  def routed(definition, endpoints, n)
    hooks = Object.new
    hooks.define_singleton_method(:connect) do |c|
      Flowctl::Pipeline::Wire.link(c, endpoints.fetch(c.id), params: { "count" => n.to_s })
    end
    hooks.define_singleton_method(:broken) { |_c, e| raise e }
    router = Flowctl::Pipeline::Router.new(definition, hooks).start
    router.wait
    router.snapshot["sink"]["in"]
  end

  # [result, elapsed seconds, CPU seconds of this process (the wiring's own cost)]
  def timed
    t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    c = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
    count = yield
    [count, Process.clock_gettime(Process::CLOCK_MONOTONIC) - t, Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) - c]
  end

  def main
    definition = Flowctl::Pipeline::Definition.parse(YAML_TEXT, file: "bench")
    cp = Flowctl::Pipeline::EmbeddedControlPlane.new.start
    sup = Flowctl::Pipeline::Supervisor.new(definition, Flowctl::Pipeline::ControlPlaneView.new(cp.endpoint),
                                            control_plane: cp.endpoint)
    sup.start_all
    endpoints = sup.slots.transform_values(&:endpoint)
    direct(endpoints, 1000) # warm-up
    routed(definition, endpoints, 1000)
    best = { "direct" => 0.0, "runner" => 0.0 }
    cpu = { "direct" => Float::INFINITY, "runner" => Float::INFINITY }
    ROUNDS.times do |round|
      { "direct" => -> { direct(endpoints, EVENTS) }, "runner" => -> { routed(definition, endpoints, EVENTS) } }.each do |name, fn|
        count, seconds, cpu_s = timed(&fn)
        raise "#{name}: #{count} of #{EVENTS} events arrived" unless count == EVENTS

        rate = EVENTS / seconds
        best[name] = rate if rate > best[name]
        cpu[name] = [cpu[name], cpu_s * 1e6 / EVENTS].min
        puts format("round %d %-7s %9.0f events/s (%.2f s), wiring CPU %.1f us/event", round + 1, name, rate, seconds,
                    cpu_s * 1e6 / EVENTS)
      end
    end
    puts format("best: direct %.0f events/s, runner %.0f events/s: runner/direct = %.2fx (goal >= 0.9x); " \
                "wiring CPU per event: direct %.1f us, runner %.1f us", best["direct"], best["runner"],
                best["runner"] / best["direct"], cpu["direct"], cpu["runner"])
  ensure
    sup&.stop_all(grace: 2)
    cp&.stop
  end
end

PipelineRunnerBench.main if $PROGRAM_NAME == __FILE__
