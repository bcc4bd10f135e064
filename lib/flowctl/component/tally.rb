# frozen_string_literal: true

module Flowctl
  module Component
    class Metrics
      # The standard counts of one stream, written by that stream's thread only: no lock
      # per event. Metrics adds every live tally into each snapshot and folds a tally into
      # its own totals when its stream ends (#retire), under its lock. A reader on another
      # thread sees each field as it was at some moment (Integer and Float ivars are read
      # whole under the GVL); two fields may be one event apart in a snapshot.
      #
      #   tally = metrics.tally
      #   tally.begin_event
      #   tally.end_event(seconds, Process.clock_gettime(Process::CLOCK_MONOTONIC), emitted, failed)
      #   metrics.retire(tally)
      class Tally
        LAST = BUCKETS.size # the +Inf bucket

        attr_reader :received, :emitted, :failed, :in_flight, :buckets, :latency_sum, :last_at

        def initialize
          @received = @emitted = @failed = @in_flight = 0
          @buckets = Array.new(LAST + 1, 0)
          @latency_sum = 0.0
          @last_at = nil # CLOCK_MONOTONIC seconds of the last event's end
        end

        def begin_event
          @received += 1
          @in_flight += 1
        end

        # The event left after `seconds`, at monotonic time `now`, having produced
        # `emitted` events; failed: true when it raised.
        def end_event(seconds, now, emitted, failed)
          @in_flight -= 1
          i = 0
          i += 1 while i < LAST && BUCKETS[i] < seconds # most events land in the first buckets
          @buckets[i] += 1
          @latency_sum += seconds
          @emitted += emitted
          @failed += 1 if failed
          @last_at = now
        end

        # Events sent without going through the component's method (a source's yields).
        def emitted!(n = 1)
          @emitted += n
        end
      end
    end
  end
end
