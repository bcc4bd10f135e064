# frozen_string_literal: true

# Where the CPU of bench/pipeline.rb's processes goes, thread by thread: one run of the same
# four processes (source, processor, consumer, runner; 1 KiB events, a warm-up first), then each
# thread's CPU µs per event and context switches per event, from /proc/<pid>/task/*/{stat,status}
# read before and after the timed pass (the runner's threads are read while it runs: it exits
# when done; a thread that ended before the last reading is not counted).
#
#   ruby bench/pipeline_threads.rb [flowctl|official]   # BENCH_EVENTS (default 50000), BENCH_WARMUP (2000)
#
# Threads: flowctl-server-N (the Ruby worker running the handler), ruby3.1 in a component (the
# server's acceptor, which polls the server's connections), flowctl-pump (the pumps' driver),
# flowctl-writer (a bidi call's writer thread), default-executo and grpc_global_tim (gRPC's).
require_relative "pipeline"

module PipelineThreads
  module_function

  # tid => [name, CPU seconds, context switches]
  def snapshot(pid)
    Dir["/proc/#{pid}/task/*"].to_h do |t|
      stat = File.read("#{t}/stat").split(") ", 2).last.split
      status = File.read("#{t}/status")
      switches = %w[voluntary nonvoluntary].sum { |k| status[/^#{k}_ctxt_switches:\s+(\d+)/, 1].to_i }
      [File.basename(t), [File.read("#{t}/comm").strip, (Integer(stat[11]) + Integer(stat[12])) / PipelineBench::TICK, switches]]
    end
  rescue Errno::ENOENT, Errno::ESRCH
    {}
  end

  def spawn_components(impl, ports)
    PipelineBench::KINDS.to_h do |k|
      [k, Process.spawn(RbConfig.ruby, File.join(PipelineBench::DIR, "#{impl}_components.rb"), k, ports[k].to_s,
                        err: File::NULL)]
    end
  end

  def report(name, before, after, events)
    total = switches = 0.0
    parts = after.filter_map do |tid, (thread, cpu, cs)|
      b = before[tid] || [thread, 0, 0]
      c = (cpu - b[1]) * 1e6 / events
      s = (cs - b[2]).to_f / events
      total += c
      switches += s
      format("%s %.1f/%.3f", thread, c, s) if c >= 0.2 || s >= 0.01
    end
    puts format("%-10s %5.1f µs/event %.3f switches/event | %s", name, total, switches, parts.join(", "))
  end

  def main
    impl = ARGV.fetch(0, "flowctl")
    events = Integer(ENV.fetch("BENCH_EVENTS", "50000"))
    ports = PipelineBench::KINDS.to_h { |k| [k, PipelineBench.free_port] }
    pids = spawn_components(impl, ports)
    PipelineBench::KINDS.each { |k| PipelineBench.wait_listening(ports[k], pids[k]) }
    r_in, w_in = IO.pipe
    r_out, w_out = IO.pipe
    runner = Process.spawn(RbConfig.ruby, File.join(PipelineBench::DIR, "#{impl}_runner.rb"),
                           *PipelineBench::KINDS.map { |k| ports[k].to_s }, events.to_s, PipelineBench::WARMUP.to_s,
                           in: r_in, out: w_out)
    [r_in, w_out].each(&:close)
    raise "#{impl} runner: no warm-up" unless r_out.gets == "ready\n"

    all = pids.merge("runner" => runner)
    before = all.transform_values { |pid| snapshot(pid) }
    last_runner = {}
    done = false
    watcher = Thread.new do
      until done
        s = snapshot(runner)
        last_runner = s if s.size > 1 # an exiting process keeps one thread
        sleep 0.02
      end
    end
    w_in.puts("go")
    result = JSON.parse(r_out.read)
    done = true
    watcher.join
    after = pids.transform_values { |pid| snapshot(pid) }.merge("runner" => last_runner)
    puts format("bench/pipeline_threads.rb %s: %d events, %.0f events/s; load average %s", impl, events,
                events / result["seconds"], PipelineBench.load_average)
    all.each_key { |k| report(k, before[k], after[k], events) }
  ensure
    Process.wait(runner) if runner
    PipelineBench.stop(pids)
  end
end

PipelineThreads.main if $PROGRAM_NAME == __FILE__
