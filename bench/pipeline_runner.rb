# frozen_string_literal: true

# The runner's own overhead: events/s through source -> processor -> consumer (three
# processes, 1 KiB events) wired by Flowctl::Pipeline::Router (bounded inboxes, event-type
# filters, counters, acknowledgements, replay buffers) against the same running components
# wired directly (StreamEvents -> Process -> Consume with two threads and nothing else).
# Both wirings run in this process on the same components, in pairs whose order alternates
# (direct first, then runner first, ...) so that a drift of the machine's load falls on both.
# Printed per pair: events/s of each and their ratio; at the end the median ratio of the
# pairs, the best of each, and the CPU each wiring costs per event: the wiring process
# alone, and all four processes together (the components' CPU read from /proc), which is
# what bounds the throughput when the cores are shared (the events/s of a busy machine
# measure the share of CPU each round got).
#
#   ruby bench/pipeline_runner.rb      # BENCH_EVENTS (default 20000) per round, BENCH_ROUNDS pairs (default 5)
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl/pipeline"
require "rbconfig"
require "etc"

module PipelineRunnerBench
  EVENTS = Integer(ENV.fetch("BENCH_EVENTS", "20000"))
  ROUNDS = Integer(ENV.fetch("BENCH_ROUNDS", "5"))
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

  # CPU seconds (user + system) a process has used so far, from /proc (0 where there is none).
  def cpu_of(pid)
    fields = File.read("/proc/#{pid}/stat").split(") ", 2)[1].split
    (Integer(fields[11]) + Integer(fields[12])).fdiv(Etc.sysconf(Etc::SC_CLK_TCK))
  rescue SystemCallError, ArgumentError, NoMethodError
    0.0
  end

  # [result, elapsed seconds, CPU seconds of this process (the wiring's own cost), CPU
  # seconds of the components]
  def timed(pids)
    t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    c = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
    before = pids.sum { |pid| cpu_of(pid) }
    count = yield
    [count, Process.clock_gettime(Process::CLOCK_MONOTONIC) - t, Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) - c,
     pids.sum { |pid| cpu_of(pid) } - before]
  end

  def median(list) = list.sort[list.size / 2]

  def main
    definition = Flowctl::Pipeline::Definition.parse(YAML_TEXT, file: "bench")
    cp = Flowctl::Pipeline::EmbeddedControlPlane.new.start
    sup = Flowctl::Pipeline::Supervisor.new(definition, Flowctl::Pipeline::ControlPlaneView.new(cp.endpoint),
                                            control_plane: cp.endpoint)
    sup.start_all
    endpoints = sup.slots.transform_values(&:endpoint)
    pids = sup.slots.values.map { |s| s.child.pid }
    direct(endpoints, 1000) # warm-up
    routed(definition, endpoints, 1000)
    wirings = { "direct" => -> { direct(endpoints, EVENTS) }, "runner" => -> { routed(definition, endpoints, EVENTS) } }
    rates = Hash.new { |h, k| h[k] = [] }
    own = Hash.new { |h, k| h[k] = [] }
    total = Hash.new { |h, k| h[k] = [] }
    ratios = []
    ROUNDS.times do |round|
      order = round.even? ? %w[direct runner] : %w[runner direct]
      order.each do |name|
        count, seconds, cpu_s, components_s = timed(pids, &wirings[name])
        raise "#{name}: #{count} of #{EVENTS} events arrived" unless count == EVENTS

        rates[name] << EVENTS / seconds
        own[name] << cpu_s * 1e6 / EVENTS
        total[name] << (cpu_s + components_s) * 1e6 / EVENTS
      end
      ratios << rates["runner"].last / rates["direct"].last
      puts format("pair %d (%s first): direct %6.0f events/s, runner %6.0f events/s, runner/direct %.2fx; " \
                  "CPU us/event wiring %.1f / %.1f, all processes %.1f / %.1f", round + 1, order[0],
                  rates["direct"].last, rates["runner"].last, ratios.last, own["direct"].last, own["runner"].last,
                  total["direct"].last, total["runner"].last)
    end
    puts format("median runner/direct %.2fx over %d pairs (goal >= 0.9x); best direct %.0f, runner %.0f events/s (%.2fx)",
                median(ratios), ratios.size, rates["direct"].max, rates["runner"].max, rates["runner"].max / rates["direct"].max)
    puts format("median CPU us/event: wiring process direct %.1f, runner %.1f; all four processes direct %.1f, " \
                "runner %.1f (%.2fx the events per CPU-second)", median(own["direct"]), median(own["runner"]),
                median(total["direct"]), median(total["runner"]), median(total["direct"]) / median(total["runner"]))
  ensure
    sup&.stop_all(grace: 2)
    cp&.stop
  end
end

PipelineRunnerBench.main if $PROGRAM_NAME == __FILE__
