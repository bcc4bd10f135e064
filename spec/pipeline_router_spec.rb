# frozen_string_literal: true

require "spec_helper"
require "flowctl/pipeline"

# The data plane alone, with in-process links standing in for the components' streams:
# fan-out, fan-in, event-type filters, backpressure, dead letters, replay after a break.
RSpec.describe Flowctl::Pipeline::Router do
  # fewer events under GC_STRESS (every allocation is a full GC there)
  def self.n(count) = ENV["GC_STRESS"] == "1" ? [count / 10, 5].max : count
  def n(count) = self.class.n(count)
  # fewer still for the examples that run event by event, twice each
  def few(count) = ENV["GC_STRESS"] == "1" ? [count / 50, 5].max : count

  # A source's StreamEvents: the events after the resume token.
  class FakeSource
    attr_reader :opened_with

    def initialize(events, fail_after: nil)
      @events = events
      @fail_after = fail_after
      @cancelled = false
    end

    def open(token)
      @opened_with = token
      @start = token ? @events.index { |e| e.id == token } + 1 : 0
    end

    def each
      @events[@start..].each_with_index do |e, i|
        raise Flowctl::Cancelled, "cancelled" if @cancelled
        raise Flowctl::Unavailable, "source died" if @fail_after && i == @fail_after

        yield e
      end
    end

    def cancel = @cancelled = true
  end

  # A processor's Process: replies through a queue; fn maps one event to replies.
  class FakeProcessor
    def initialize(fn, die_after: nil, delay: 0)
      @fn = fn
      @replies = SizedQueue.new(4) # a stream's flow control
      @die_after = die_after
      @delay = delay
      @n = 0
    end

    def write(e)
      raise Flowctl::Unavailable, "gone" if @replies.closed?

      @n += 1
      if @die_after && @n > @die_after
        @replies.close
        raise Flowctl::Unavailable, "processor died"
      end
      sleep @delay if @delay.positive?
      r = @fn.call(e)
      (r.is_a?(Array) ? r : [r]).each { |x| @replies << x }
    end

    def close_write = @replies.close

    def read
      r = @replies.pop
      raise Flowctl::Unavailable, "processor died" if r.nil? && @die_after && @n > @die_after

      r
    end

    def cancel = @replies.close
  end

  class FakeSink
    Response = Struct.new(:events_consumed, :events_failed, :errors)
    attr_reader :got

    def initialize(got, delay: 0)
      @got = got
      @delay = delay
      @n = 0
    end

    def write(e)
      sleep @delay if @delay.positive?
      @got << e
      @n += 1
    end

    def finish
      n = @n
      @n = 0
      Response.new(n, 0, [])
    end

    def cancel; end
  end

  # Hooks: a fresh link per connect from the factory; every break may reconnect.
  class Hooks
    attr_reader :connects, :breaks

    def initialize(&factory)
      @factory = factory
      @connects = Hash.new(0)
      @breaks = []
      @lock = Mutex.new
    end

    def connect(c)
      n = @lock.synchronize { @connects[c.id] += 1 }
      @factory.call(c, n)
    end

    def broken(c, err)
      @lock.synchronize { @breaks << [c.id, err.class] }
      true
    end
  end

  # Parsed with GC.stress off: under GC_STRESS the YAML alone takes minutes (a full GC per
  # allocation), and the loader is stressed by pipeline_definition_spec.
  def definition(yaml_spec, queue_size: 4)
    stress = GC.stress
    GC.stress = false
    Flowctl::Pipeline::Definition.parse(<<~YAML, check_commands: false)
      apiVersion: flowctl/v1
      kind: Pipeline
      metadata: {name: t}
      spec:
        queue_size: #{queue_size}
      #{yaml_spec.gsub(/^/, '  ')}
    YAML
  ensure
    GC.stress = stress
  end

  def events(prefix, n, type: "raw") = Array.new(n) { |i| Flowctl::V1::Event.new(id: "#{prefix}#{i}", type: type, payload: i.to_s, metadata: {}) }

  def drain(queue) = Array.new(queue.size) { queue.pop }

  shared_examples "the router's data plane" do
    it "delivers every event exactly once through a fan-out, a fan-in and a slow sink" do
      d = definition(<<~YAML)
        sources:
          - {id: a, command: [x]}
          - {id: b, command: [x]}
        processors:
          - {id: up, command: [x], inputs: [a, b]}
          - {id: tag, command: [x], inputs: [a]}
        sinks:
          - {id: slow, command: [x], inputs: [up, tag]}
          - {id: fast, command: [x], inputs: [up]}
      YAML
      got = { "slow" => Queue.new, "fast" => Queue.new }
      hooks = Hooks.new do |c, _|
        case c.id
        when "a" then FakeSource.new(events("a", n(200)))
        when "b" then FakeSource.new(events("b", n(150)))
        when "up" then FakeProcessor.new(->(e) { Flowctl::V1::Event.new(id: e.id, type: "up", payload: e.payload.upcase, metadata: {}) })
        when "tag" then FakeProcessor.new(->(e) { Flowctl::V1::Event.new(id: "t-#{e.id}", type: "tag", payload: e.payload, metadata: {}) })
        when "slow" then FakeSink.new(got["slow"], delay: 0.0005)
        else FakeSink.new(got["fast"])
        end
      end
      router = new_router(d, hooks).start
      expect(router.wait(time_limit(30))).to be(true)
      slow = Array.new(got["slow"].size) { got["slow"].pop.id }
      fast = Array.new(got["fast"].size) { got["fast"].pop.id }
      expect(slow.tally.values.uniq).to eq([1])
      expect(slow.sort).to eq((events("a", n(200)).map(&:id) + events("b", n(150)).map(&:id) + events("t-a", n(200)).map(&:id)).sort)
      expect(fast.sort).to eq((events("a", n(200)) + events("b", n(150))).map(&:id).sort)
      snap = router.snapshot
      expect(snap["up"].values_at("in", "out", "failed", "dropped", "in_flight")).to eq([n(350), n(350), 0, 0, 0])
      expect(snap["slow"]["in"]).to eq(n(550))
      expect(hooks.breaks).to eq([])
    end

    it "applies backpressure: a blocked sink holds the sources back with bounded queues" do
      d = definition(<<~YAML, queue_size: 3)
        sources: [{id: a, command: [x]}]
        processors: [{id: p, command: [x]}]
        sinks: [{id: s, command: [x]}]
      YAML
      gate = Queue.new
      got = Queue.new
      sink = FakeSink.new(got)
      sink.define_singleton_method(:write) { |e| gate.pop; got << e }
      sink.define_singleton_method(:finish) { FakeSink::Response.new(0, 0, []) }
      hooks = Hooks.new do |c, _|
        { "a" => -> { FakeSource.new(events("a", 100)) }, "p" => -> { FakeProcessor.new(->(e) { e }) },
          "s" => -> { sink } }.fetch(c.id).call
      end
      router = new_router(d, hooks).start
      sleep 0.3
      snap = router.snapshot
      # inbox of p (3) + one in p's writer + p's stream (4) + one in p's reader + inbox of s (3) + one at the
      # sink + one the source is pushing
      expect(snap["a"]["out"]).to be <= 14
      sleep 0.2
      expect(router.snapshot["a"]["out"]).to eq(snap["a"]["out"])
      100.times { gate << true }
      expect(router.wait(time_limit(10))).to be(true)
      expect(got.size).to eq(100)
    end

    it "filters by input_event_types, counts what nobody takes, and routes failures to the dead-letter sink" do
      d = definition(<<~YAML)
        dead_letter: dlq
        sources: [{id: a, command: [x]}]
        processors: [{id: p, command: [x]}]
        sinks:
          - {id: evens, command: [x], inputs: [p], input_event_types: [even]}
          - {id: dlq, command: [x]}
      YAML
      got = { "evens" => Queue.new, "dlq" => Queue.new }
      hooks = Hooks.new do |c, _|
        case c.id
        when "a" then FakeSource.new(events("a", 30))
        when "p"
          FakeProcessor.new(lambda do |e|
            i = e.payload.to_i
            meta = (i % 10).zero? ? { "flowctl.error" => "ten" } : {}
            Flowctl::V1::Event.new(id: e.id, type: i.even? ? "even" : "odd", payload: e.payload, metadata: meta)
          end)
        else FakeSink.new(got[c.id])
        end
      end
      router = new_router(d, hooks).start
      expect(router.wait(time_limit(10))).to be(true)
      expect(got["evens"].size).to eq(12) # 15 even, 3 of them failed
      dead = Array.new(got["dlq"].size) { got["dlq"].pop }
      expect(dead.map(&:id)).to eq(%w[a0 a10 a20])
      expect(dead.first.metadata).to eq("flowctl.error" => "ten", "flowctl.failed_at" => "p")
      snap = router.snapshot
      expect(snap["p"].values_at("out", "failed", "dropped")).to eq([30, 3, 15])
    end

    it "reconnects a processor that died and writes again what it had not acknowledged: nothing lost" do
      d = definition(<<~YAML)
        sources: [{id: a, command: [x]}]
        processors: [{id: p, command: [x]}]
        sinks: [{id: s, command: [x]}]
      YAML
      got = Queue.new
      hooks = Hooks.new do |c, attempt|
        case c.id
        when "a" then FakeSource.new(events("a", n(500)))
        when "p" then FakeProcessor.new(->(e) { e }, die_after: attempt == 1 ? n(120) : nil)
        else FakeSink.new(got)
        end
      end
      router = new_router(d, hooks).start
      expect(router.wait(time_limit(10))).to be(true)
      ids = Array.new(got.size) { got.pop.id }
      expect(ids.uniq.sort).to eq(events("a", n(500)).map(&:id).sort)
      expect(hooks.breaks).to eq([["p", Flowctl::Unavailable]])
      expect(router.snapshot["p"]["reconnects"]).to eq(1)
    end

    it "resumes a source that died from the last event it routed" do
      d = definition(<<~YAML)
        sources: [{id: a, command: [x]}]
        sinks: [{id: s, command: [x]}]
      YAML
      got = Queue.new
      sources = []
      hooks = Hooks.new do |c, attempt|
        if c.id == "a"
          FakeSource.new(events("a", 50), fail_after: attempt == 1 ? 20 : nil).tap { |s| sources << s }
        else
          FakeSink.new(got)
        end
      end
      router = new_router(d, hooks).start
      expect(router.wait(time_limit(10))).to be(true)
      expect(sources.map(&:opened_with)).to eq([nil, "a19"])
      expect(Array.new(got.size) { got.pop.id }).to eq(events("a", 50).map(&:id))
    end

    it "fails the pipeline when the hooks give a component up, naming it" do
      d = definition(<<~YAML)
        sources: [{id: a, command: [x]}]
        sinks: [{id: s, command: [x]}]
      YAML
      hooks = Hooks.new { |c, _| c.id == "a" ? FakeSource.new(events("a", 50), fail_after: 5) : FakeSink.new(Queue.new) }
      hooks.define_singleton_method(:broken) { |_c, _e| false }
      router = new_router(d, hooks).start
      expect { router.wait(time_limit(10)) }.to raise_error(Flowctl::Pipeline::Router::Failed, /source "a": Flowctl::Unavailable: .*source died/)
    end
  end

  shared_examples "the router's data plane, event by event" do
    let(:chain) do
      definition(<<~YAML)
        sources: [{id: a, command: [x]}]
        processors: [{id: p, command: [x]}]
        sinks: [{id: s, command: [x]}]
      YAML
    end

    it "takes the direct path exactly where a reader has one producer and is not the dead-letter sink" do
      d = definition(<<~YAML)
        dead_letter: dlq
        sources:
          - {id: a, command: [x]}
          - {id: b, command: [x]}
        processors:
          - {id: both, command: [x], inputs: [a, b]}
          - {id: one, command: [x], inputs: [a]}
        sinks:
          - {id: s, command: [x], inputs: [one]}
          - {id: t, command: [x], inputs: [both]}
          - {id: dlq, command: [x]}
      YAML
      nodes = new_router(d, Hooks.new { raise "not started" }).nodes
      direct = nodes.values.reject { |n| n.component.source? }.to_h { |n| [n.id, !n.direct.nil?] }
      expect(direct).to eq("both" => false, "one" => direct_path?, "s" => direct_path?, "t" => direct_path?, "dlq" => false)
      expect(nodes.values.count { |n| n.inbox.nil? == n.direct.nil? && !n.component.source? }).to eq(0)
    end

    it "delivers a chain's events exactly once and in order, across several Consume batches" do
      count = few(2 * Flowctl::Pipeline::Router::SINK_BATCH + 500)
      got = Queue.new
      hooks = Hooks.new do |c, _|
        case c.id
        when "a" then FakeSource.new(events("a", count))
        when "p" then FakeProcessor.new(->(e) { Flowctl::V1::Event.new(id: e.id, type: "done", payload: e.payload, metadata: {}) })
        else FakeSink.new(got)
        end
      end
      router = new_router(chain, hooks).start
      expect(router.wait(time_limit(30))).to be(true)
      expect(drain(got).map(&:id)).to eq(events("a", count).map(&:id))
      snap = router.snapshot
      expect(snap["p"].values_at("in", "out", "in_flight")).to eq([count, count, 0])
      expect(snap["s"].values_at("in", "in_flight", "replayed")).to eq([count, 0, 0])
    end

    it "replays what a crashed processor had not acknowledged: every event exactly once, in order" do
      count = few(600)
      got = Queue.new
      hooks = Hooks.new do |c, attempt|
        case c.id
        when "a" then FakeSource.new(events("a", count))
        # each write sleeps: a producer that got in while the replay is being written would show
        when "p" then FakeProcessor.new(->(e) { e }, die_after: attempt <= 2 ? few(150) : nil, delay: 0.0001)
        else FakeSink.new(got)
        end
      end
      router = new_router(chain, hooks).start
      expect(router.wait(time_limit(20))).to be(true)
      expect(drain(got).map(&:id)).to eq(events("a", count).map(&:id))
      expect(hooks.breaks).to eq([["p", Flowctl::Unavailable]] * 2)
      snap = router.snapshot
      expect(snap["p"].values_at("out", "reconnects", "in_flight")).to eq([count, 2, 0])
      expect(snap["p"]["replayed"]).to be_positive
    end

    it "replays to a sink that broke what its Consume stream had not acknowledged (at least once, order kept)" do
      count = few(300)
      limit = few(100)
      got = Queue.new
      hooks = Hooks.new do |c, attempt|
        case c.id
        when "a" then FakeSource.new(events("a", count))
        when "p" then FakeProcessor.new(->(e) { e })
        else
          sink = FakeSink.new(got, delay: 0.0001) # (see above)
          if attempt == 1
            written = 0
            sink.define_singleton_method(:write) do |e|
              raise Flowctl::Unavailable, "sink died" if (written += 1) > limit

              super(e)
            end
          end
          sink
        end
      end
      router = new_router(chain, hooks).start
      expect(router.wait(time_limit(20))).to be(true)
      ids = drain(got).map(&:id)
      expect(ids.uniq).to eq(events("a", count).map(&:id))
      expect(ids.size).to eq(count + limit) # the first stream's events, all written again
      expect(ids.last(count)).to eq(events("a", count).map(&:id))
      expect(hooks.breaks).to eq([["s", Flowctl::Unavailable]])
    end

    it "merges two sources into one processor (fan-in) and filters by event type on the way" do
      d = definition(<<~YAML)
        sources:
          - {id: a, command: [x]}
          - {id: b, command: [x]}
        processors:
          - {id: p, command: [x], inputs: [a, b], input_event_types: [raw]}
        sinks:
          - {id: s, command: [x], inputs: [p], input_event_types: [kept]}
      YAML
      a = events("a", few(300))
      b = events("b", few(200)).each_with_index.map { |e, i| i.odd? ? e.dup.tap { |x| x.type = "other" } : e }
      got = Queue.new
      hooks = Hooks.new do |c, _|
        case c.id
        when "a" then FakeSource.new(a)
        when "b" then FakeSource.new(b)
        when "p"
          FakeProcessor.new(->(e) { Flowctl::V1::Event.new(id: e.id, type: e.payload.to_i % 3 == 0 ? "gone" : "kept", payload: e.payload, metadata: {}) })
        else FakeSink.new(got)
        end
      end
      router = new_router(d, hooks).start
      expect(router.wait(time_limit(20))).to be(true)
      ids = drain(got).map(&:id)
      taken = (a + b.select { |e| e.type == "raw" }).reject { |e| (e.payload.to_i % 3).zero? }
      expect(ids.sort).to eq(taken.map(&:id).sort)
      expect(ids.grep(/\Aa/)).to eq(taken.map(&:id).grep(/\Aa/)) # each source's order kept
      expect(ids.grep(/\Ab/)).to eq(taken.map(&:id).grep(/\Ab/))
      snap = router.snapshot
      raw = a.size + b.count { |e| e.type == "raw" }
      expect(snap["b"]["dropped"]).to eq(b.size - b.count { |e| e.type == "raw" })
      expect(snap["p"].values_at("in", "out", "dropped")).to eq([raw, raw, raw - taken.size])
    end

    it "drains what the sources routed when they are stopped" do
      endless = Object.new
      endless.define_singleton_method(:open) { |_token| @cancelled = false }
      endless.define_singleton_method(:cancel) { @cancelled = true }
      endless.define_singleton_method(:each) do |&block|
        i = 0
        loop do
          raise Flowctl::Cancelled, "cancelled" if @cancelled

          block.call(Flowctl::V1::Event.new(id: "e#{i}", type: "raw", payload: i.to_s, metadata: {}))
          i += 1
        end
      end
      got = Queue.new
      hooks = Hooks.new { |c, _| { "a" => endless, "p" => FakeProcessor.new(->(e) { e }) }.fetch(c.id) { FakeSink.new(got) } }
      router = new_router(chain, hooks).start
      sleep 0.05 until router.snapshot["s"]["in"] >= few(50)
      router.stop_sources
      expect(router.wait(time_limit(10))).to be(true)
      routed = router.snapshot["a"]["out"]
      expect(drain(got).map(&:id)).to eq(Array.new(routed) { |i| "e#{i}" })
    end

    it "ends at once when aborted with a sink that never takes an event" do
      blocked = Queue.new
      sink = FakeSink.new(Queue.new)
      sink.define_singleton_method(:write) { |_e| blocked.pop }
      sink.define_singleton_method(:cancel) { blocked.close }
      hooks = Hooks.new { |c, _| { "a" => FakeSource.new(events("a", few(1000))), "p" => FakeProcessor.new(->(e) { e }) }.fetch(c.id) { sink } }
      router = new_router(chain, hooks).start
      sleep 0.05 until router.snapshot["a"]["out"].positive?
      router.abort
      expect(router.wait(time_limit(5))).to be(true)
    end
  end

  # Every example below runs twice: every reader on an inbox, and the readers with one
  # producer on the direct path (DirectInput: the producer's thread writes into their
  # stream). The links here are Ruby objects, so nothing is relayed (relay: false says so;
  # the relays, the default, run on real streams in pipeline_relay_spec.rb).
  [false, true].each do |direct_path|
    context(direct_path ? "with the direct path" : "with inboxes") do
      define_method(:new_router) { |d, hooks| described_class.new(d, hooks, direct: direct_path, relay: false) }
      define_method(:direct_path?) { direct_path }
      # Under GC_STRESS (every allocation a full GC, minutes an example) each group runs on one
      # path: the scenarios that came first on inboxes, the event-by-event ones on the direct path.
      stress = ENV["GC_STRESS"] == "1"
      include_examples "the router's data plane" unless stress && direct_path
      include_examples "the router's data plane, event by event" unless stress && !direct_path
    end
  end
end
