# frozen_string_literal: true

# The runner's own overhead: events/s through source -> processor -> consumer (three
# processes, 1 KiB events) wired by Flowctl::Pipeline::Router (event-type filters, failure
# routing, counters, acknowledgements, replay lists; a chain's hops relayed natively,
# Native::Stream#relay) against the same running components wired directly (StreamEvents
# -> Process -> Consume with two threads and nothing else).
# Both wirings run in this process on the same components, in pairs whose order alternates
# (direct first, then runner first, ...) so that a drift of the machine's load falls on both.
# Printed per pair: events/s of each and their ratio; at the end the median ratio of the
# pairs and its spread, the median events/s of each, and the median CPU each wiring costs
# per event: the wiring process alone, and all four processes together (the components'
# CPU read from /proc), which is what bounds the throughput when the cores are shared (the
# events/s of a busy machine measure the share of CPU each round got). The load average is
# printed before and after.
#
# BENCH_RUBY_PATH=1 adds the Router's Ruby paths to each round (Router.new(..., relay:
# false): every event a Ruby object routed by Ruby): "runner-inboxes" (a thread and a
# bounded inbox per reader) and "runner-direct" (direct: true, the producer's thread writes
# into the reader's stream), the order of the wirings rotating from round to round.
#
#   ruby bench/pipeline_runner.rb      # BENCH_EVENTS (default 20000) per round, BENCH_ROUNDS pairs (default 9)
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl/pipeline"
require "rbconfig"
require "etc"

module PipelineRunnerBench
  EVENTS = Integer(ENV.fetch("BENCH_EVENTS", "20000"))
  ROUNDS = Integer(ENV.fetch("BENCH_ROUNDS", "9"))
  RUBY_PATH = ENV["BENCH_RUBY_PATH"] == "1"
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
  def routed(definition, endpoints, n, direct: false, relay: true)
    hooks = Object.new
    hooks.define_singleton_method(:connect) do |c|
      Flowctl::Pipeline::Wire.link(c, endpoints.fetch(c.id), params: { "count" => n.to_s })
    end
    hooks.define_singleton_method(:broken) { |_c, e| raise e }
    router = Flowctl::Pipeline::Router.new(definition, hooks, direct: direct, relay: relay).start
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

  def median(list)
    sorted = list.sort
    (sorted[(sorted.size - 1) / 2] + sorted[sorted.size / 2]) / 2.0
  end

  def load_average = File.read("/proc/loadavg").split.first(3).join(" ")

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
    if RUBY_PATH
      wirings["runner-inboxes"] = -> { routed(definition, endpoints, EVENTS, relay: false) }
      wirings["runner-direct"] = -> { routed(definition, endpoints, EVENTS, direct: true, relay: false) }
    end
    puts "load average before: #{load_average}"
    rates = Hash.new { |h, k| h[k] = [] }
    own = Hash.new { |h, k| h[k] = [] }
    total = Hash.new { |h, k| h[k] = [] }
    ratios = Hash.new { |h, k| h[k] = [] }
    ROUNDS.times do |round|
      order = wirings.keys.rotate(round % wirings.size) # two wirings: direct first, then runner first, ...
      order.each do |name|
        count, seconds, cpu_s, components_s = timed(pids, &wirings[name])
        raise "#{name}: #{count} of #{EVENTS} events arrived" unless count == EVENTS

        rates[name] << EVENTS / seconds
        own[name] << cpu_s * 1e6 / EVENTS
        total[name] << (cpu_s + components_s) * 1e6 / EVENTS
      end
      (wirings.keys - ["direct"]).each { |name| ratios[name] << rates[name].last / rates["direct"].last }
      puts format("round %d (%s first): %s; CPU us/event wiring process %s, all processes %s", round + 1, order[0],
                  wirings.keys.map { |k| format("%s %6.0f events/s", k, rates[k].last) }.join(", ") +
                  ratios.map { |k, r| format(", %s/direct %.2fx", k, r.last) }.join,
                  wirings.keys.map { |k| format("%.1f", own[k].last) }.join(" / "),
                  wirings.keys.map { |k| format("%.1f", total[k].last) }.join(" / "))
    end
    puts "load average after: #{load_average}"
    ratios.each do |name, list|
      puts format("median %s/direct %.2fx over %d rounds (goal >= 0.9x; min %.2fx, max %.2fx, %d of %d >= 0.9x)",
                  name, median(list), list.size, list.min, list.max, list.count { |r| r >= 0.9 }, list.size)
    end
    puts "median events/s: " + wirings.keys.map { |k| format("%s %.0f", k, median(rates[k])) }.join(", ")
    puts "median CPU us/event, wiring process: " + wirings.keys.map { |k| format("%s %.1f", k, median(own[k])) }.join(", ")
    puts "median CPU us/event, all four processes: " +
         wirings.keys.map { |k| format("%s %.1f", k, median(total[k])) }.join(", ") +
         (wirings.keys - ["direct"]).map { |k| format("; %s %.2fx the events per CPU-second of direct", k, median(total["direct"]) / median(total[k])) }.join
  ensure
    sup&.stop_all(grace: 2)
    cp&.stop
  end
end

PipelineRunnerBench.main if $PROGRAM_NAME == __FILE__
