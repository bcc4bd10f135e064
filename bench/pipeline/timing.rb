# frozen_string_literal: true

require "json"

# What both runners of bench/pipeline.rb report: wall time and the runner's own CPU time
# of the timed pass, with the count of events the consumer answered, as one JSON line.
#
# The block runs one pass of n events through the pipeline (new streams on the same
# connections) and returns the consumer's count. A warm-up pass of `warmup` events runs first
# (both sides alike: connections, flow-control windows and code paths are warm when the timing
# starts); then the runner says "ready", the bench reads the components' CPU and says go.
module PipelineTiming
  def self.report(count, warmup)
    yield warmup if warmup.positive?
    $stdout.puts "ready"
    $stdout.flush
    $stdin.gets # the bench says go once it has read the components' CPU
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    c0 = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
    consumed = yield count
    puts JSON.generate(consumed: consumed, seconds: Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0,
                       cpu: Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) - c0)
  end
end
