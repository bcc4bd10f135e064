# frozen_string_literal: true

# Events per second through source -> processor -> consumer, each component its own process,
# wired by a fourth process the way `flowctl run` wires them (StreamEvents -> Process ->
# Consume), 1 KiB events: the components written on Flowctl::Component (bench/pipeline/
# flowctl_*.rb) against the same three written with the official grpc gem
# (bench/pipeline/official_*.rb). Prints events/s, the CPU each process spent per event, and
# the ratios (> 1: flowctl is faster / cheaper).
#
#   ruby bench/pipeline.rb              # BENCH_EVENTS (default 20000) events per run,
#                                       # BENCH_ROUNDS (default 3) runs each, alternating; the best counts;
#                                       # BENCH_WARMUP (default 2000) events through first, untimed
require "json"
require "rbconfig"
require "socket"

module PipelineBench
  EVENTS = Integer(ENV.fetch("BENCH_EVENTS", "20000"))
  ROUNDS = Integer(ENV.fetch("BENCH_ROUNDS", "3"))
  WARMUP = Integer(ENV.fetch("BENCH_WARMUP", "2000")) # events through the pipeline before each timed run
  DIR = File.join(__dir__, "pipeline")
  KINDS = %w[source processor consumer].freeze
  PROCESSES = (KINDS + ["runner"]).freeze
  TICK = 100.0 # USER_HZ: /proc/<pid>/stat counts CPU time in 1/100 s

  module_function

  def free_port
    s = TCPServer.new("127.0.0.1", 0)
    s.local_address.ip_port
  ensure
    s&.close
  end

  def wait_listening(port, pid)
    deadline = Time.now + 30
    loop do
      TCPSocket.new("127.0.0.1", port).close
      return
    rescue Errno::ECONNREFUSED
      raise "component #{pid} exited" if Process.waitpid(pid, Process::WNOHANG)
      raise "component on #{port} did not listen within 30 s" if Time.now > deadline

      sleep 0.05
    end
  end

  # CPU seconds (user + system) a process has used so far.
  def cpu(pid)
    fields = File.read("/proc/#{pid}/stat").split(") ", 2).last.split
    (Integer(fields[11]) + Integer(fields[12])) / TICK
  end

  # One run: {events_per_s:, cpu_us: {source:, processor:, consumer:, runner:}}
  def run(impl)
    ports = KINDS.to_h { |k| [k, free_port] }
    pids = KINDS.to_h do |k|
      [k, Process.spawn(RbConfig.ruby, File.join(DIR, "#{impl}_components.rb"), k, ports[k].to_s, err: File::NULL)]
    end
    KINDS.each { |k| wait_listening(ports[k], pids[k]) }
    r_in, w_in = IO.pipe
    r_out, w_out = IO.pipe
    runner = Process.spawn(RbConfig.ruby, File.join(DIR, "#{impl}_runner.rb"), *KINDS.map { |k| ports[k].to_s },
                           EVENTS.to_s, WARMUP.to_s, in: r_in, out: w_out)
    [r_in, w_out].each(&:close)
    raise "#{impl} runner: no warm-up" unless r_out.gets == "ready\n" # connected, WARMUP events through
    before = pids.transform_values { |pid| cpu(pid) }
    w_in.puts("go")
    result = JSON.parse(r_out.read)
    after = pids.transform_values { |pid| cpu(pid) }
    _, st = Process.wait2(runner)
    raise "#{impl} runner failed" unless st.success?
    raise "#{impl}: consumed #{result['consumed']} of #{EVENTS}" unless result["consumed"] == EVENTS

    cpu_us = KINDS.to_h { |k| [k, (after[k] - before[k]) * 1e6 / EVENTS] }
    cpu_us["runner"] = result["cpu"] * 1e6 / EVENTS # measured by the runner itself
    { events_per_s: EVENTS / result["seconds"], cpu_us: cpu_us }
  ensure
    stop(pids)
  end

  # Ends the components (kind => pid; nil when none started).
  def stop(pids)
    pids&.each_value do |pid|
      Process.kill(:TERM, pid)
    rescue Errno::ESRCH
      nil
    end
    pids&.each_value { |pid| Process.wait(pid) rescue nil } # rubocop:disable Style/RescueModifier
  end

  # The best of a side's runs: the highest events/s, the lowest CPU per event of each process
  # (and of the four together, in one run).
  def best(runs)
    { events_per_s: runs.map { |r| r[:events_per_s] }.max,
      cpu_us: PROCESSES.to_h { |k| [k, runs.map { |r| r[:cpu_us][k] }.min] },
      total: runs.map { |r| r[:cpu_us].values.sum }.min }
  end

  def load_average = File.read("/proc/loadavg").split.first(3).join(" ")

  # The rounds alternate the two sides (flowctl, grpc gem, flowctl, ...), so that a change in
  # the machine's load during the run falls on both alike.
  def main
    only = ENV["BENCH_ONLY"] # "official" or "flowctl": one side only (for trying the bench out)
    return puts(JSON.generate(best(Array.new(ROUNDS) { run(only) }))) if only

    puts "bench/pipeline.rb: #{EVENTS} events of 1 KiB, source -> processor -> consumer (+ runner), " \
         "best of #{ROUNDS} alternating rounds; load average #{load_average}"
    runs = { "flowctl" => [], "official" => [] }
    ROUNDS.times { runs.each { |impl, list| list << run(impl) } }
    f = best(runs["flowctl"])
    o = best(runs["official"])
    puts format("%-28s %12s %12s %8s", "", "flowctl", "grpc gem", "ratio")
    puts format("%-28s %12.0f %12.0f %7.2fx", "events/s", f[:events_per_s], o[:events_per_s], f[:events_per_s] / o[:events_per_s])
    PROCESSES.each do |k|
      puts format("%-28s %12.1f %12.1f %7.2fx", "CPU µs/event, #{k}", f[:cpu_us][k], o[:cpu_us][k], o[:cpu_us][k] / f[:cpu_us][k])
    end
    puts format("%-28s %12.1f %12.1f %7.2fx", "CPU µs/event, all four", f[:total], o[:total], o[:total] / f[:total])
    puts "load average at the end: #{load_average}"
  end
end

PipelineBench.main if $PROGRAM_NAME == __FILE__
