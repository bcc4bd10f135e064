# frozen_string_literal: true

require "spec_helper"
require "flowctl/pipeline"

# The Router's relays (Native::Stream#relay, ext/flowctl/relay.c) on real flowctl.v1
# streams: components served in this process by Flowctl::Server, wired by the Router the
# way flowctl-pipeline wires them (Pipeline::Wire links).
RSpec.describe "Flowctl::Pipeline::Router's relays" do
  def self.count(n) = ENV["GC_STRESS"] == "1" ? [n / 20, 30].max : n
  def count(n) = self.class.count(n)

  # Components whose behaviour each example sets: what the source emits, what the processor
  # replies, when one of them fails (once), what the sinks got.
  class RelayWorld
    attr_accessor :events, :reply, :source_dies_after, :processor_dies_after, :sink_dies_after
    attr_reader :got, :source_tokens

    def initialize
      @lock = Mutex.new
      @got = Hash.new { |h, k| h[k] = [] }
      @source_tokens = []
      @reply = ->(e) { Flowctl::V1::Event.new(id: e.id, type: "done", payload: e.payload) }
    end

    def once(name)
      @lock.synchronize do
        @fired ||= {}
        next false if @fired[name]

        @fired[name] = true
      end
    end

    def take(sink, event) = @lock.synchronize { @got[sink] << event }

    def stream_events(req, _call)
      @lock.synchronize { @source_tokens << (req.resume ? req.resume_token : nil) }
      start = req.resume ? events.index { |e| e.id == req.resume_token } + 1 : 0
      dies = source_dies_after && once(:source) ? source_dies_after : nil
      events[start..].each_with_index do |e, i|
        raise Flowctl::Unavailable, "source died" if dies && i == dies

        yield e
      end
      nil # (a handler's return value that is an Enumerable is sent as well)
    end

    def process(events, _call)
      dies = processor_dies_after && once(:processor) ? processor_dies_after : nil
      events.each_with_index.lazy.flat_map do |e, i|
        raise Flowctl::Unavailable, "processor died" if dies && i == dies

        Array(reply.call(e))
      end
    end

    def consume(events, call)
      sink = call.headers["x-sink"] || "sink"
      dies = sink_dies_after && sink == "sink" && once(:sink) ? sink_dies_after : nil
      n = 0
      events.each do |e|
        raise Flowctl::Unavailable, "sink died" if dies && n == dies

        take(sink, e)
        n += 1
      end
      Flowctl::V1::ConsumeResponse.new(events_consumed: n)
    end
  end

  before(:all) do
    @world = RelayWorld.new
    @server = Flowctl::Server.new(port: 0, tls: false, pool_size: 8)
    [Flowctl::V1::SourceService, Flowctl::V1::ProcessorService, Flowctl::V1::ConsumerService].each do |svc|
      @server.handle(svc, @world)
    end
    @endpoint = "127.0.0.1:#{@server.start}"
  end

  after(:all) { @server&.stop(grace: 1) }

  let(:world) { @world.tap { |w| w.instance_variable_set(:@got, Hash.new { |h, k| h[k] = [] }) } }

  # Sinks tell themselves apart by a header (one server serves them all).
  class SinkLinkAs < Flowctl::Pipeline::Wire::SinkLink
    def initialize(endpoint, name)
      super(endpoint)
      @client = Flowctl::Pipeline::Wire.client_class(:ConsumerClient)
                                       .new(endpoint, tls: false, timeout: 10, headers: { "x-sink" => name })
    end
  end

  def hooks(endpoint)
    h = Object.new
    h.define_singleton_method(:connect) do |c|
      c.sink? ? SinkLinkAs.new(endpoint, c.id) : Flowctl::Pipeline::Wire.link(c, endpoint)
    end
    h.define_singleton_method(:broken) { |_c, _e| true }
    h
  end

  def definition(yaml)
    Flowctl::Pipeline::Definition.parse(<<~YAML, check_commands: false)
      apiVersion: flowctl/v1
      kind: Pipeline
      metadata: {name: relay}
      spec:
      #{yaml.gsub(/^/, '  ')}
    YAML
  end

  CHAIN = <<~YAML
    sources: [{id: src, command: [x]}]
    processors: [{id: p, command: [x], inputs: [src]}]
    sinks: [{id: sink, command: [x], inputs: [p]}]
  YAML

  def run(defn)
    router = Flowctl::Pipeline::Router.new(defn, hooks(@endpoint)).start
    expect(router.wait(60)).to be(true)
    router
  end

  def events(n) = Array.new(n) { |i| Flowctl::V1::Event.new(id: "e#{i}", type: "raw", payload: "x#{i}".b) }

  it "relays a chain's hops: every event exactly once and in order, across Consume batches, counted" do
    n = count(2500) # three checkpoints of the sink (SINK_BATCH 1000)
    world.events = events(n)
    router = run(definition(CHAIN))
    expect(router.nodes.values.map { |x| [x.id, !x.relay.nil?] }.to_h).to eq("src" => true, "p" => true, "sink" => false)
    expect(world.got["sink"].map(&:id)).to eq(world.events.map(&:id))
    expect(world.got["sink"].map(&:type).uniq).to eq(["done"])
    snap = router.snapshot
    expect(snap["src"]["out"]).to eq(n)
    expect(snap["p"].values_at("in", "out", "in_flight")).to eq([n, n, 0])
    expect(snap["sink"].values_at("in", "failed", "in_flight")).to eq([n, 0, 0])
  end

  it "relays exactly the hops of a chain: fan-out, fan-in and the dead-letter sink keep the Ruby path" do
    router = Flowctl::Pipeline::Router.new(definition(<<~YAML), hooks(@endpoint))
      dead_letter: dlq
      sources: [{id: a, command: [x]}, {id: b, command: [x]}, {id: c, command: [x]}]
      processors:
        - {id: fan_in, command: [x], inputs: [a, b]}
        - {id: q, command: [x], inputs: [c]}
      sinks:
        - {id: s1, command: [x], inputs: [fan_in]}
        - {id: s2, command: [x], inputs: [fan_in]}
        - {id: s3, command: [x], inputs: [q]}
        - {id: dlq, command: [x]}
    YAML
    relays = router.nodes.transform_values { |x| x.relay_to&.id }.compact
    expect(relays).to eq("c" => "q", "q" => "s3")
    inputs = router.nodes.transform_values { |x| x.inbox ? :inbox : x.direct ? :direct : nil }.compact
    expect(inputs).to eq("fan_in" => :inbox, "q" => :direct, "s1" => :inbox, "s2" => :inbox, "s3" => :direct, "dlq" => :inbox)
    plain = Flowctl::Pipeline::Router.new(router.definition, hooks(@endpoint), relay: false)
    expect(plain.nodes.values.map(&:relay).compact).to be_empty
    expect(plain.nodes.values.count(&:direct)).to eq(0)
  end

  it "drops in C what the reader does not take (counted) and diverts failed events to the dead-letter sink" do
    n = count(600)
    world.events = events(n)
    world.reply = lambda do |e|
      i = Integer(e.id.delete_prefix("e"))
      meta = (i % 7).zero? ? { "flowctl.error" => "bad #{i}" } : {}
      Flowctl::V1::Event.new(id: e.id, type: i.odd? ? "kept" : "gone", payload: e.payload, metadata: meta)
    end
    router = run(definition(<<~YAML))
      dead_letter: dlq
      sources: [{id: src, command: [x]}]
      processors: [{id: p, command: [x], inputs: [src]}]
      sinks:
        - {id: sink, command: [x], inputs: [p], input_event_types: [kept]}
        - {id: dlq, command: [x]}
    YAML
    ids = ->(pred) { (0...n).select(&pred).map { |i| "e#{i}" } }
    failed = ids.call(->(i) { (i % 7).zero? })
    expect(router.nodes["p"].relay).not_to be_nil
    expect(world.got["sink"].map(&:id)).to eq(ids.call(->(i) { i.odd? && !(i % 7).zero? }))
    expect(world.got["dlq"].map(&:id)).to eq(failed)
    expect(world.got["dlq"].map { |e| e.metadata["flowctl.failed_at"] }.uniq).to eq(["p"])
    expect(world.got["dlq"].first.metadata["flowctl.error"]).to eq("bad 0")
    snap = router.snapshot
    expect(snap["p"]["failed"]).to eq(failed.size)
    expect(snap["p"]["dropped"]).to eq(ids.call(->(i) { i.even? && !(i % 7).zero? }).size)
    expect(snap["sink"]["in"]).to eq(world.got["sink"].size)
  ensure
    world.reply = ->(e) { Flowctl::V1::Event.new(id: e.id, type: "done", payload: e.payload) }
  end

  it "replays what a processor that died had not acknowledged: every event exactly once, in order" do
    n = count(1500)
    world.events = events(n)
    world.processor_dies_after = count(400)
    router = run(definition(CHAIN))
    expect(world.got["sink"].map(&:id)).to eq(world.events.map(&:id))
    expect(router.snapshot["p"]["reconnects"]).to eq(1)
  ensure
    world.processor_dies_after = nil
  end

  it "writes again to a sink that broke what its Consume stream had not acknowledged (at least once, in order)" do
    n = count(1500)
    world.events = events(n)
    world.sink_dies_after = count(500) + 7
    router = run(definition(CHAIN))
    got = world.got["sink"].map(&:id)
    expect(got.uniq).to eq(world.events.map(&:id))
    expect(router.snapshot["sink"]["reconnects"]).to eq(1)
    expect(router.snapshot["sink"]["replayed"]).to be_positive
  ensure
    world.sink_dies_after = nil
  end

  it "resumes a source that died from the last event it relayed" do
    n = count(1200)
    world.events = events(n)
    world.source_dies_after = count(300)
    router = run(definition(CHAIN))
    expect(world.got["sink"].map(&:id)).to eq(world.events.map(&:id))
    expect(world.source_tokens.last).to eq("e#{count(300) - 1}")
    expect(router.snapshot["src"]["reconnects"]).to eq(1)
  ensure
    world.source_dies_after = nil
  end

  it "keeps every event under GC.compact between runs (the lists hold bytes, no Ruby objects)" do
    world.events = events(count(300))
    2.times do
      GC.compact if GC.respond_to?(:compact)
      run(definition(CHAIN))
    end
    expect(world.got["sink"].map(&:id)).to eq(world.events.map(&:id) * 2)
  end
end
