# frozen_string_literal: true

module Flowctl
  # Calls under a Fiber scheduler (the async gem, or any Fiber::Scheduler): the call's fiber
  # waits on a Thread::Queue, which gives the thread back to the scheduler, instead of
  # blocking the thread. Unary calls complete without any thread of their own (below); a
  # stream's reads and half-close wait on a helper thread (#blocking). The call completes on the extension's watcher thread
  # (ext/flowctl/fiber.c); one Ruby thread, "flowctl-fibers", wakes the waiting fibers.
  #
  # A fiber interrupted while it waits (Async's with_timeout, Task#stop, Fiber#raise) cancels
  # its call and waits for the cancellation to complete before the exception goes on, as a
  # thread's call does: nothing is left in flight.
  module FiberCalls
    @waiting = {} # call id => Thread::Queue of the fiber that waits
    @reader = nil
    @pid = nil

    class << self
      # Whether a call made now should yield to a scheduler.
      def scheduled?
        Fiber.scheduler && !Fiber.current.blocking?
      end

      # Native::Call.unary's arguments and result.
      def unary(channel, path, bytes, timeout, headers)
        call = Native::FiberCall.new(channel, path, bytes, timeout, headers)
        queue = Thread::Queue.new
        start_reader
        @waiting[call.id] = queue
        begin
          call.start
          wait(call, queue)
        ensure
          @waiting.delete(call.id)
        end
        call.result
      end

      # A stream's wait (a read, a half-close) under a scheduler: it runs on a helper thread
      # ("flowctl-fiber-wait") while the fiber waits on a queue; an interrupt of the fiber
      # cancels the stream (which ends the helper's wait) and waits for the helper. Without a
      # scheduler: the block, in this thread.
      def blocking(stream)
        return yield unless scheduled?

        queue = Thread::Queue.new
        helper = Thread.new do
          queue << [true, yield]
        rescue Exception => e # rubocop:disable Lint/RescueException -- handed to the fiber
          queue << [false, e]
        end
        helper.name = "flowctl-fiber-wait"
        ok, value = wait(stream, queue)
        ok ? value : raise(value)
      end

      private

      # Pops queue; an interrupt meanwhile cancels the call (a FiberCall or a stream), waits
      # for what it was waiting for, and is raised.
      def wait(call, queue)
        queue.pop
      rescue Exception # rubocop:disable Lint/RescueException -- cancel for any interrupt, then re-raise
        call.cancel
        settle(queue)
        raise
      end

      # After a cancel the call completes at once; a second interrupt meanwhile is kept
      # for after it, so the call is never left in flight.
      def settle(queue)
        interrupt = nil
        begin
          queue.pop
        rescue Exception => e # rubocop:disable Lint/RescueException -- re-raised below
          interrupt ||= e
          retry
        end
        raise interrupt if interrupt
      end

      def start_reader
        return if @reader&.alive? && @pid == Process.pid

        @pid = Process.pid
        @waiting.clear unless @reader.nil? || @reader.alive? # a forked child: the parent's calls
        @reader = Thread.new do
          loop do
            Native::FiberCall.completed.each { |id| @waiting[id]&.push(true) }
          end
        end
        @reader.name = "flowctl-fibers"
      end
    end
  end
end
