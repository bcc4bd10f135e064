# frozen_string_literal: true

module Flowctl
  module ControlPlane
    class Registry
      # A named background thread that runs a block every `interval` seconds, or at once when
      # woken (#wake), and ends after one last run when stopped (#stop). The janitor and the
      # persistence writer run on it. (Queue#pop(timeout:) is Ruby 3.2; a ConditionVariable
      # gives the timed wait on 3.1.)
      class Ticker
        def initialize(name, interval, finally: nil, &block)
          @interval = interval
          @block = block
          @finally = finally
          @mutex = Mutex.new
          @cond = ConditionVariable.new
          @woken = false
          @stopping = false
          @thread = Thread.new do
            Thread.current.name = name
            run
          end
        end

        def wake
          @mutex.synchronize do
            @woken = true
            @cond.signal
          end
        end

        # Ends the thread after a last run of the block; idempotent.
        def stop
          @mutex.synchronize do
            @stopping = true
            @cond.signal
          end
          @thread.join unless @thread.equal?(Thread.current)
          nil
        end

        # From a finalizer (no Mutex there): the thread ends after its next run.
        def stop_later
          @stopping = true
        end

        def alive? = @thread.alive?

        private

        def run
          loop do
            last = @mutex.synchronize do
              @cond.wait(@mutex, @interval) unless @woken || @stopping
              @woken = false
              @stopping
            end
            @block.call
            break if last || @stopping
          end
        ensure
          @finally&.call
        end
      end
    end
  end
end
