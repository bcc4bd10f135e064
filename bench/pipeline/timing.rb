# frozen_string_literal: true

require "json"

# What both runners of bench/pipeline.rb report: wall time and the runner's own CPU time
# of the block, with the count of events the consumer answered, as one JSON line.
module PipelineTiming
  def self.report
    $stdin.gets # the bench says go once every process is up
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    c0 = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
    consumed = yield
    puts JSON.generate(consumed: consumed, seconds: Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0,
                       cpu: Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) - c0)
  end
end
