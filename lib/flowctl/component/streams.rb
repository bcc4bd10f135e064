# frozen_string_literal: true

module Flowctl
  module Component
    # The open streams of a component, so that shutdown can end them without losing an event
    # that was taken:
    #
    # - a handler runs inside #run, where Stopping can only be raised while it waits in
    #   #interruptible (a source's method; Thread.handle_interrupt), never while the
    #   component's method runs or a reply is written;
    # - #drain sets the stopping flag: a handler that is busy finishes its event, finds the
    #   flag at its next #read and ends its stream normally (a consumer answers); one that
    #   still waits for a request after a short settling time has its call cancelled (it had
    #   no event in hand; #read returns nil), one in #interruptible is raised out of it;
    #   #drain returns when every stream has ended or at the deadline.
    class Streams
      # Raised into a handler waiting for its next request at shutdown.
      class Stopping < StandardError; end

      SETTLE = 0.2 # seconds a busy stream gets to end by itself before waiting ones are raised
      DEFER = { Stopping => :never }.freeze # frozen masks: no Hash per event
      ALLOW = { Stopping => :immediate }.freeze

      def initialize
        @lock = Mutex.new
        @cond = ConditionVariable.new
        @threads = {} # Thread => its requests while it waits in #read, true in #interruptible, else false
        @stopping = false
      end

      def stopping? = @stopping

      def size = @lock.synchronize { @threads.size }

      def run
        @lock.synchronize { @threads[Thread.current] = false }
        Thread.handle_interrupt(DEFER) do
          yield
        ensure
          discard_pending
        end
      ensure
        @lock.synchronize do
          @threads.delete(Thread.current)
          @cond.broadcast
        end
      end

      # The next request (requests.read: Flowctl::Server::Requests), or nil once stopping.
      # No interrupt mask per event: while it waits, the stream is marked with its requests,
      # and #drain cancels that call (the read raises Flowctl::Cancelled, the end here).
      def read(requests)
        threads = @threads
        t = Thread.current
        threads[t] = requests
        begin
          return nil if @stopping # after the mark: a #drain that missed the mark set this first

          requests.read
        ensure
          threads[t] = false
        end
      rescue Flowctl::Cancelled
        raise unless @stopping

        nil
      end

      # Runs the block where shutdown may raise Stopping into it (the block is waiting, with no
      # event in hand); returns its value, or nil when stopping (before or during the block).
      def interruptible
        return nil unless waiting(true, start: true)

        begin
          Thread.handle_interrupt(ALLOW) { yield }
        ensure
          waiting(false)
        end
      rescue Stopping
        nil
      end

      # Inside #interruptible: runs the block where no Stopping can arrive (an event is in hand).
      # (Once per event of a source: the flags are set here without #waiting's calls; the
      # thread is inside #run, so its key exists.)
      def critical
        threads = @threads
        t = Thread.current
        threads[t] = false
        begin
          Thread.handle_interrupt(DEFER) { yield }
        ensure
          threads[t] = true
        end
      end

      # Stops the streams (see the class comment); true when all have ended by the deadline.
      def drain(deadline)
        @lock.synchronize { @stopping = true }
        wait_until([deadline, now + SETTLE].min)
        @lock.synchronize do
          @threads.each do |t, waiting|
            if waiting == true then t.raise(Stopping, "component stopping") # in #interruptible
            elsif waiting then waiting.cancel # in #read: its requests
            end
          end
        end
        wait_until(deadline)
      end

      private

      # Marks the current stream as waiting (true) or not. Returns false, marking nothing,
      # when asked to start waiting while stopping and start is true. Without the lock: a
      # Hash store of a key that exists is atomic under the GVL, and #drain reads the flags
      # under the lock with the stopping flag already set (a stream that misses it is raised).
      def waiting(flag, start: false)
        return false if start && @stopping

        t = Thread.current
        @threads[t] = flag if @threads.key?(t)
        true
      end

      def wait_until(deadline)
        @lock.synchronize do
          until @threads.empty?
            left = deadline - now
            return false if left <= 0

            @cond.wait(@lock, left)
          end
          true
        end
      end

      # A Stopping that arrived after the handler's last read returned is still pending:
      # take it here so that it never reaches the server's worker.
      def discard_pending
        return unless Thread.pending_interrupt?(Stopping)

        Thread.handle_interrupt(ALLOW) { Thread.pass }
      rescue Stopping
        nil
      end

      def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
