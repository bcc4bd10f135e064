# frozen_string_literal: true

module Flowctl
  module Pipeline
    class Router
      # The entrance of a reader (processor or sink) that has one producer and is not the
      # dead-letter sink: the producer's thread writes each event straight into the
      # reader's current link (its Process or Consume stream) instead of pushing it into an
      # inbox that the reader's own writer thread pops. That saves a thread hand-off per
      # event and per reader; what the inbox did is kept:
      #
      # - Backpressure: a write waits on the stream's flow control (the component is slow),
      #   or while the link is being reopened (the component is restarting).
      # - Replay: every event is remembered in the reader's pending list before it is
      #   written, under the same lock that swaps the link, so an event is either written
      #   to the link that is current or replayed on the next one (in order, before any new
      #   event: producers wait until the replay is done).
      # - End of input: #close (the producer is done) half-closes a processor's stream, or
      #   lets a sink's driver finish its last Consume stream.
      # - A write that fails marks the link broken and cancels it: the reader's driver (a
      #   processor's, reading its replies; a sink's, waiting in #wait_end) sees the break,
      #   reconnects and calls #open again with the new link.
      #
      # Fan-in keeps the inbox: several producers' threads writing into one stream would
      # serialise on it anyway, and the inbox orders them. So does the dead-letter sink
      # (every component feeds it).
      #
      # A producer that relays (Router#relay_out, Native::Stream#relay) writes through the
      # same entrance without Ruby per event: #acquire_relay gives it the link and the epoch
      # of the pending list's gate, which is open exactly while a link is published here. A
      # link that breaks shuts the gate; the relay then holds the event it read (not
      # remembered, not written) until the next link is published, after the replay.
      class DirectInput
        def initialize(node)
          @node = node
          @lock = node.lock # the link and the pending list's gate change under it
          @ready = ConditionVariable.new
          @sink = node.component.sink?
          @link = nil       # the link producers write to; nil while (re)opening
          @closed = false   # the producer is done
          @aborted = false
          @broken = nil     # the error a write met (a sink's driver raises it)
          @half_closed = nil # the link close_write went to
          @epoch = nil      # the pending list's gate epoch while @link is published
        end

        # Producer: writes event to the reader's link, waiting for one (raises
        # ClosedQueueError once the run is aborted, as a closed inbox does).
        def write(event)
          link = acquire(event)
          @node.stats.in += 1
          link.write(event)
          checkpoint(link) if @sink && @node.pending.size >= SINK_BATCH
        rescue *TRANSPORT_ERRORS, Flowctl::RPCError => e
          break_link(link, e)
        end

        # Producer: no more events. A processor's stream is half-closed here when it is
        # open, else by #open once the replay is written.
        def close
          link = @lock.synchronize do
            @closed = true
            @ready.broadcast
            @half_closed = @link if @link && !@sink
          end
          half_close(link) if link && !@sink
        end

        def abort
          @lock.synchronize do
            @aborted = true
            @ready.broadcast
          end
        end

        # Driver: a new link. Writes again what the last one did not acknowledge (a
        # processor's replay on a thread of its own, returned, since its replies must be read
        # meanwhile), then hands the link to the producer, or half-closes it when the
        # producer is done already.
        def open(link)
          again = @lock.synchronize do
            @broken = nil
            @node.pending.events
          end
          @node.stats.replayed += again.size
          return replay(link, again) if @sink || again.empty?

          Thread.new do
            Thread.current.report_on_exception = false
            replay(link, again)
          end
        end

        # Sink driver: waits until the producer is done (true), a write broke the link
        # (raises its error) or the run is aborted (ClosedQueueError).
        def wait_end
          @lock.synchronize do
            @ready.wait(@lock) until @closed || @broken || @aborted
            raise @broken if @broken
            raise ClosedQueueError, "#{@node.component.label}: the run was aborted" unless @closed
          end
          true
        end

        # Driver: was the input closed on this link (so its stream ending is expected)?
        def half_closed?(link) = @lock.synchronize { @half_closed.equal?(link) }

        # Driver: the link is gone (it broke or its work is done); producers wait for the next.
        def detach(link)
          @lock.synchronize { unpublish if @link.equal?(link) }
        end

        # Relaying producer: [link, epoch, limit] once a link is published (raises
        # ClosedQueueError once the run is aborted); limit: the events a sink's current
        # Consume stream may still take before its checkpoint (0: no limit).
        def acquire_relay
          @lock.synchronize do
            until @link
              raise ClosedQueueError, "#{@node.component.label}: the run was aborted" if @aborted

              @ready.wait(@lock)
            end
            [@link, @epoch, @sink ? [SINK_BATCH - @node.pending.size, 1].max : 0]
          end
        end

        # Relaying producer: a sink's checkpoint is due.
        def checkpoint_relay(link)
          checkpoint(link)
        rescue *TRANSPORT_ERRORS, Flowctl::RPCError => e
          break_link(link, e)
        end

        # Relaying producer: a write to link failed (its stream is over).
        def ended(link)
          err = @sink ? link.failure : nil
          break_link(link, err || IOError.new("#{@node.component.label} ended its stream"))
        end

        private

        def acquire(event)
          @lock.synchronize do
            until @link
              raise ClosedQueueError, "#{@node.component.label}: the run was aborted" if @aborted

              @ready.wait(@lock)
            end
            @node.remember(event)
            @link
          end
        end

        # (lock held) Producers wait for the next link; a relay's next event is held.
        def unpublish
          @link = nil
          @epoch = nil
          @node.pending.shut
        end

        def replay(link, again)
          again.each { |e| link.write(e) }
          publish(link)
          nil
        rescue *TRANSPORT_ERRORS, Flowctl::RPCError => e
          raise if @sink # the sink's driver is the caller: its break

          break_link(link, e)
          nil
        end

        def publish(link)
          close = @lock.synchronize do
            next @half_closed = link if @closed && !@sink
            next false if @closed

            @link = link
            @epoch = @node.pending.open
            @ready.broadcast
            false
          end
          half_close(link) if close
        end

        def half_close(link)
          link.close_write
        rescue *TRANSPORT_ERRORS, Flowctl::RPCError => e
          break_link(link, e)
        end

        # A sink's Consume stream is ended every SINK_BATCH events: its response
        # acknowledges what was written.
        def checkpoint(link) = @node.checkpoint(link)

        def break_link(link, err)
          @lock.synchronize do
            next unless link && @link.equal?(link)

            unpublish
            @broken = err
            @ready.broadcast
          end
          link&.cancel
        end
      end
    end
  end
end
