# frozen_string_literal: true

module Flowctl
  module Component
    # max_concurrent: at most `limit` events inside the component's method at once, over
    # every stream. A stream whose next event finds the gate full waits here and reads
    # nothing more meanwhile, so gRPC flow control slows its sender: nothing queues.
    # A nil limit lets everything through.
    class Gate
      attr_reader :limit

      def initialize(limit)
        @limit = limit
        @busy = 0
        @lock = Mutex.new
        @cond = ConditionVariable.new
      end

      # Runs the block once a slot is free.
      def pass
        return yield if @limit.nil?

        @lock.synchronize do
          @cond.wait(@lock) while @busy >= @limit
          @busy += 1
        end
        begin
          yield
        ensure
          @lock.synchronize do
            @busy -= 1
            @cond.signal
          end
        end
      end

      def busy = @lock.synchronize { @busy }
    end
  end
end
