# frozen_string_literal: true

module Flowctl
  module Pipeline
    # The data plane: moves events along the DAG of a Definition through links to the
    # components (sources' StreamEvents, processors' Process, sinks' Consume).
    #
    # - Every processor and sink has one bounded inbox (Definition#queue_size events) that
    #   all its inputs feed (fan-in); every producer pushes each event into the inbox of
    #   each component that reads from it and accepts its type (fan-out, filtered by
    #   input_event_types). A push waits while the inbox is full: a slow sink slows its
    #   processors, which slows the sources (gRPC flow control does the rest); nothing is
    #   dropped. A chain's hop (a producer whose one reader has no other producer) is
    #   relayed: the producer's thread moves the events natively (Native::Stream#relay,
    #   ext/flowctl/relay.c: no Ruby object per event, the same filters, failures,
    #   acknowledgements and replay), into the reader's stream (its DirectInput). (With
    #   direct: true every reader that has one producer has a DirectInput, written to event
    #   by event from Ruby where its producer cannot relay; relay: false turns relaying off.)
    # - An event a processor replies with metadata "flowctl.error" set has failed: it is
    #   counted and goes to the dead-letter sink when the pipeline declares one.
    # - A link that breaks (the component died: UNAVAILABLE, CANCELLED, a closed
    #   connection) is reopened once the hooks say the component is back; what had been
    #   written to it and not acknowledged is written again first (processors acknowledge
    #   an event by replying with its id, which acknowledges every event written before it;
    #   sinks acknowledge at the end of their stream). Sources resume from the last event
    #   routed (its resume token). Delivery is at-least-once across a crash, exactly once
    #   without one. A stream that fails with another status (the component refused an
    #   event) fails the events written to it and not acknowledged.
    #
    # hooks: #connect(component) -> a link once the component is ready (raises to give
    # up); #broken(component, error) -> true to reconnect, false to fail the pipeline;
    # optional #resume_token(component) -> a token to resume a source from when the
    # router has none.
    class Router
      FAILED_KEY = "flowctl.error"
      RESUME_KEY = "resume_token"
      # A reader's events written and not acknowledged are kept for a replay, at most this
      # many and this many bytes (past either the oldest are let go: counted as unprotected).
      REPLAY_LIMIT = 10_000
      REPLAY_BYTES = 256 << 20
      # A sink's Consume stream is finished (its ConsumeResponse acknowledges what it
      # got) and a new one opened after this many events, so that a sink crash replays
      # at most that many.
      SINK_BATCH = 1000
      WAKE = Object.new.freeze
      private_constant :WAKE
      # Errors that mean the component (or its connection) went away: reconnect and replay.
      TRANSPORT_ERRORS = [Flowctl::Unavailable, Flowctl::Cancelled, IOError].freeze

      # The pipeline cannot go on (a component gave up); message names it.
      class Failed < Flowctl::Error; end

      # Per component counters kept in Ruby (Router#snapshot adds the relays' and the
      # pending lists'); in_flight is read live.
      Stats = Struct.new(:in, :out, :failed, :dropped, :replayed, :unprotected, :reconnects, keyword_init: true) do
        def self.zero = new(in: 0, out: 0, failed: 0, dropped: 0, replayed: 0, unprotected: 0, reconnects: 0)
      end

      # One component's place in the data plane. A reader (processor or sink) has an inbox,
      # or a DirectInput when it reads from one producer only (Router#initialize).
      # pending: the events written to a reader and not acknowledged (a Native::Pending,
      # which the relays use without Ruby); relay: a producer's Native::Relay to its one
      # reader (relay_to), fed_by: the reader's side of it.
      class Node
        attr_reader :component, :inbox, :direct, :stats, :lock, :pending
        attr_accessor :producers_left, :link, :cursor, :finished, :response, :relay, :relay_to, :fed_by

        def initialize(component, queue_size, direct)
          @component = component
          @lock = Mutex.new
          @direct = direct && !component.source? ? DirectInput.new(self) : nil
          @inbox = component.source? || @direct ? nil : SizedQueue.new(queue_size)
          @stats = Stats.zero
          @pending = component.source? ? nil : Flowctl::Native::Pending.new(Flowctl::V1::Event, REPLAY_LIMIT, REPLAY_BYTES)
          @finished = false
        end

        def id = component.id
        def in_flight = (@inbox ? @inbox.size : 0) + (@pending ? @pending.size : 0)

        # Events in and out so far, the relays' included.
        def moved = @stats.in + @stats.out + (@relay ? @relay.read : 0) + (@fed_by ? @fed_by.written : 0)

        # The counters as Router#snapshot gives them.
        def counts
          h = @stats.to_h.transform_keys(&:to_s)
          if @relay
            h["out"] += @relay.read
            h["dropped"] += @relay.dropped
          end
          h["in"] += @fed_by.written if @fed_by
          h["unprotected"] = @pending ? @pending.unprotected : 0
          h
        end

        # Keeps an event written and not acknowledged, for a replay.
        def remember(event) = @pending.push(event)

        # Ends a sink's current Consume stream: its response acknowledges what was written.
        def checkpoint(link)
          response = link.finish
          @pending.clear
          return unless response

          @stats.failed += response.events_failed.to_i
          @response = response
        end
      end

      attr_reader :definition, :nodes

      # relay: (default) a chain's hops are relayed natively (Native::Stream#relay).
      # direct: true also puts the other readers that have one producer on the direct path
      # (DirectInput, written to from Ruby). Off by default: event by event from Ruby it
      # measured slower than the inboxes (docs/performance.md, "Pipeline runner");
      # bench/pipeline_runner.rb (BENCH_RUBY_PATH=1) and the specs run all three.
      def initialize(definition, hooks, direct: false, relay: true)
        @definition = definition
        @hooks = hooks
        takers = definition.components.to_h do |c|
          [c.id, definition.downstream(c.id).reject { |d| d == definition.dead_letter }]
        end
        relayed = ->(c) { relay && direct?(c) && takers.fetch(c.inputs.first) == [c.id] }
        @nodes = definition.components.to_h do |c|
          [c.id, Node.new(c, definition.queue_size, direct?(c) && (direct || relayed.call(c)))]
        end
        @downstream = definition.components.to_h { |c| [c.id, definition.downstream(c.id).map { |d| @nodes[d] }] }
        @dead = definition.dead_letter && @nodes[definition.dead_letter]
        @nodes.each_value { |n| n.producers_left = n.component.inputs.size }
        @nodes.each_value do |n|
          link_relay(@nodes.fetch(n.component.inputs.first), n) if !n.component.source? && relayed.call(n.component)
        end
        @targets = @nodes.transform_values { {} }
        # the readers a node routes to (the dead-letter sink gets failures only), and the same
        # when none of them filters by type: then no event's type need be read
        @takers = @downstream.transform_values { |rs| rs.reject { |d| d.component.dead_letter }.freeze }
        @typeless = @takers.transform_values { |rs| rs.all? { |d| d.component.input_event_types.empty? } ? rs : nil }
        @stopping = false
        @aborted = false
        @threads = []
        @errors = Queue.new
      end

      # Starts one driver thread per component (sinks first, sources last).
      def start
        order = @nodes.values.sort_by { |n| { sink: 0, processor: 1, source: 2 }[n.component.role] }
        order.each { |n| @threads << spawn_driver(n) }
        self
      end

      # Waits until every component has drained (true), the timeout passed (false), or a
      # component failed (raises Failed).
      def wait(timeout = nil)
        deadline = timeout && monotonic + timeout
        @threads.each do |t|
          left = deadline && [deadline - monotonic, 0].max
          return false unless t.join(left)
        end
        raise @errors.pop unless @errors.empty?

        true
      end

      def finished? = @threads.none?(&:alive?)

      # The first failure, if any, without waiting.
      def failure = @errors.empty? ? nil : @errors.pop.tap { |e| @errors << e }

      # Stops the sources (their streams are cancelled); the rest drains what is in flight.
      def stop_sources
        @stopping = true
        @nodes.each_value { |n| n.link&.cancel if n.component.source? }
      end

      # Cancels everything at once (after the grace period).
      def abort
        @stopping = true
        @aborted = true
        @nodes.each_value do |n|
          n.inbox&.close
          n.direct&.abort
          n.link&.cancel
        end
        @threads.each { |t| t.join(2) }
      end

      # {id => {"in" =>, "out" =>, "failed" =>, "dropped" =>, "in_flight" =>, ...}}
      def snapshot
        @nodes.transform_values { |n| n.counts.merge("in_flight" => n.in_flight) }
      end

      private

      # Does a reader take the direct path? Only with one producer (fan-in goes through an
      # inbox) and not as the dead-letter sink (everyone feeds it).
      def direct?(component) = component.inputs.size == 1 && !component.dead_letter

      def link_relay(producer, reader)
        producer.relay = Flowctl::Native::Relay.new(Flowctl::V1::Event, reader.component.input_event_types, FAILED_KEY)
        producer.relay_to = reader
        reader.fed_by = producer.relay
      end

      def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)

      def spawn_driver(node)
        Thread.new do
          Thread.current.name = "pipeline #{node.id}"
          Thread.current.report_on_exception = false
          drive(node)
        rescue Failed => e
          @errors << e
          abort_later
        rescue ClosedQueueError => e
          raise_later(node, e) unless @aborted # an inbox closes under a push only when the run is aborted
        rescue StandardError => e
          @errors << Failed.new("#{node.component.label}: #{e.class}: #{e.message}")
          abort_later
        ensure
          node.finished = true
          @hooks.done(node.component) if @hooks.respond_to?(:done)
          finish_downstream(node)
        end
      end

      def abort_later
        Thread.new { abort }
      end

      def raise_later(node, err)
        @errors << Failed.new("#{node.component.label}: #{err.class}: #{err.message}")
        abort_later
      end

      # Reconnects until the component's work is done; breaks in a row without an event
      # getting through wait a little longer each time (50 ms doubling, at most 1 s).
      def drive(node)
        failures = 0
        loop do
          return if @aborted || (node.component.source? && @stopping)

          link = @hooks.connect(node.component)
          node.link = link
          moved = node.moved
          begin
            return run_link(node, link)
          rescue *TRANSPORT_ERRORS, Flowctl::RPCError => e
            link.cancel
            return if @aborted || (node.component.source? && @stopping)

            handle_break(node, e)
            failures = node.moved == moved ? failures + 1 : 0
            sleep [0.05 * (2**[failures - 1, 5].min), 1.0].min if failures.positive?
          ensure
            node.link = nil
          end
        end
      end

      def handle_break(node, err)
        transport = TRANSPORT_ERRORS.any? { |k| err.is_a?(k) }
        fail_pending(node, err) unless transport
        raise Failed, "#{node.component.label}: #{err.class}: #{err.message}" unless @hooks.broken(node.component, err)

        node.stats.reconnects += 1
      end

      def run_link(node, link)
        case node.component.role
        when :source then run_source(node, link)
        when :processor then node.direct ? run_direct_processor(node, link) : run_processor(node, link)
        else node.direct ? run_direct_sink(node, link) : run_sink(node, link)
        end
      end

      # --- sources -----------------------------------------------------------------

      # node.cursor holds the last event routed; its resume token is worked out only when
      # the stream has to be opened again.
      def run_source(node, link)
        token = node.cursor ? resume_token_of(node.cursor) : nil
        token ||= @hooks.resume_token(node.component) if @hooks.respond_to?(:resume_token)
        link.open(token)
        return relay_source(node, link) if relays?(node, link)

        link.each do |event|
          node.stats.out += 1
          route(node, event)
          node.cursor = event
        end
      end

      def relay_source(node, link)
        relay_out(node, link.native)
      ensure
        node.cursor = node.relay.last || node.cursor
        link.close
      end

      def resume_token_of(event)
        meta = event.metadata
        token = meta && meta[RESUME_KEY]
        return token if token && !token.empty?

        c = event.respond_to?(:stellar_cursor) ? event.stellar_cursor : nil
        c ? "#{c.ledger_sequence}:#{c.index_in_ledger}" : event.id
      end

      # --- processors --------------------------------------------------------------

      def run_processor(node, link)
        stop = [false]
        writer = Thread.new do
          Thread.current.report_on_exception = false
          feed(node, link, stop)
        end
        read_replies(node, link)
        # the component ended the stream: fine once we had closed it, a break otherwise
        raise IOError, "#{node.component.label} ended its Process stream early" unless writer.join(0.5) && writer.value == :closed

        node.lock.synchronize { node.pending.clear }
      ensure
        stop_writer(node, link, writer, stop)
      end

      # Writes what was not acknowledged on the last link, then the inbox, then closes.
      # Every event is remembered before it is written, so that a break loses none.
      def feed(node, link, stop)
        replay(node, link)
        while (event = node.inbox.pop)
          next if event.equal?(WAKE)

          node.remember(event)
          break if stop[0]

          node.stats.in += 1
          link.write(event)
        end
        return :stopped if stop[0]

        link.close_write
        :closed
      rescue *TRANSPORT_ERRORS, Flowctl::RPCError, ClosedQueueError
        link.cancel
        :broken
      end

      # Wakes a writer waiting on an empty inbox (a marker it skips) and waits for it; one
      # stuck in a write to a stream nobody reads any more gets the stream cancelled.
      def stop_writer(node, link, writer, stop)
        return unless writer

        stop[0] = true
        begin
          node.inbox.push(WAKE, true)
        rescue ThreadError, ClosedQueueError
          nil # full (the writer is not waiting) or closed (it ends by itself)
        end
        return if writer.join(1)

        link.cancel
        writer.join
      end

      # A processor's replies: relayed to its one reader, or read and routed here.
      def read_replies(node, link)
        if relays?(node, link)
          relay_out(node, link.native)
          return link.done
        end

        while (reply = link.read)
          node.pending.ack(reply.peek(:id))
          node.stats.out += 1
          route(node, reply)
        end
      end

      def replay(node, link)
        again = node.pending.events
        node.stats.replayed += again.size
        again.each { |e| link.write(e) }
      end

      def fail_pending(node, err)
        failed = node.pending.take
        failed.each do |e|
          node.stats.failed += 1
          dead_letter(node, e, "#{err.class}: #{err.message}")
        end
      end

      # --- sinks -------------------------------------------------------------------

      def run_sink(node, link)
        replay(node, link)
        unacked = node.lock.synchronize { node.pending.size }
        while (event = node.inbox.pop)
          next if event.equal?(WAKE)

          node.remember(event)
          node.stats.in += 1
          link.write(event)
          unacked += 1
          next if unacked < SINK_BATCH

          node.checkpoint(link)
          unacked = 0
        end
        node.checkpoint(link)
      end

      # --- readers on the direct path (DirectInput) --------------------------------

      # The producer writes into link; this thread reads the replies. A replay after a
      # break is written by a thread of its own meanwhile.
      def run_direct_processor(node, link)
        replayer = node.direct.open(link)
        read_replies(node, link)
        raise IOError, "#{node.component.label} ended its Process stream early" unless node.direct.half_closed?(link)

        node.lock.synchronize { node.pending.clear }
      ensure
        link.cancel if replayer&.alive? # the read ended early: a replay still writing must stop
        replayer&.join
        node.direct.detach(link)
      end

      # The producer writes (and checkpoints every SINK_BATCH); this thread waits for the
      # end of the input or a break, and ends the last Consume stream.
      def run_direct_sink(node, link)
        node.direct.open(link)
        node.direct.wait_end
        node.checkpoint(link)
      ensure
        node.direct.detach(link)
      end

      # --- relays (a chain's hops, native) ---------------------------------------------

      # Links without a Native::Stream (the hooks' own) take the Ruby path, through the
      # reader's DirectInput.
      def relays?(node, link) = node.relay && link.respond_to?(:native)

      # Relays a producer's stream to its one reader until the stream ends (raising its
      # error, if any), going back to Ruby for what the relay cannot do: a failed event
      # (dead letter), a sink's checkpoint, a reader whose link broke or changed.
      def relay_out(node, stream)
        reader = node.relay_to
        input = reader.direct
        ack = node.component.source? ? nil : node.pending
        loop do
          link, epoch, limit = input.acquire_relay
          result = stream.relay(link.native, node.relay, ack, reader.pending, epoch, limit)
          case result
          when :end then return
          when :detached then next
          when :limit then input.checkpoint_relay(link)
          when :destination_ended then input.ended(link)
          else dead_letter(node, result, result.peek(:metadata)[FAILED_KEY], count: true)
          end
        end
      end

      # --- routing -----------------------------------------------------------------

      # Reads only what routing needs (Message#peek): an event that came in lazily and is
      # passed on untouched goes out as the bytes it came in, nothing decoded or encoded.
      def route(node, event)
        meta = event.peek(:metadata)
        reason = meta[FAILED_KEY] unless meta.empty?
        return dead_letter(node, event, reason, count: true) if reason

        targets = @typeless[node.id] || targets_for(node, event.peek(:type))
        if targets.empty?
          node.stats.dropped += 1
          return
        end
        targets.each { |d| d.direct ? d.direct.write(event) : d.inbox.push(event) }
      end

      # The readers of a node that take events of a type (worked out once per type; each
      # driver thread only asks for its own node).
      def targets_for(node, type)
        cache = @targets.fetch(node.id)
        cache[type] ||= @takers[node.id].select { |d| d.component.accepts?(type) }.freeze
      end

      def dead_letter(node, event, reason, count: false)
        node.stats.failed += 1 if count
        return unless @dead

        copy = event.dup
        copy.metadata = (event.metadata || {}).merge(FAILED_KEY => reason.to_s, "flowctl.failed_at" => node.id)
        @dead.inbox.push(copy)
      rescue ClosedQueueError
        nil
      end

      # A component is done: those reading from it have one producer less; when none is
      # left their inbox closes, and they drain it and finish.
      def finish_downstream(node)
        @downstream[node.id].each do |d|
          close = d.lock.synchronize { (d.producers_left -= 1) <= 0 }
          next unless close

          d.direct ? d.direct.close : d.inbox.close
        end
        close_dead_letter
      end

      def close_dead_letter
        return unless @dead

        others = @nodes.each_value.reject { |n| n.equal?(@dead) }
        @dead.inbox.close if others.all?(&:finished)
      end
    end
  end
end
