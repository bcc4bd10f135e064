# frozen_string_literal: true

require "spec_helper"

RSpec.describe Flowctl::ControlPlane::Registry do
  CPM = Flowctl::ControlPlane

  # A clock the examples move by hand.
  class FakeClock
    attr_accessor :now

    def initialize = @now = Time.at(1_700_000_000)
    def call = @now
    def advance(seconds) = @now += seconds
  end

  let(:clock) { FakeClock.new }
  let(:registry) { described_class.new(ttl: 30, clock: clock, janitor_interval: nil) }
  after { registry.close }

  describe "registration" do
    it "keeps the id, endpoint and metadata of each kind of component" do
      r = registry.register_processor(CPM::RegisterProcessorRequest.new(processor_id: "p1", endpoint: "10.0.0.1:9000",
                                                                        metadata: { "zone" => "a" }))
      expect(r).to eq(CPM::RegisterProcessorResponse.new(processor_id: "p1", success: true,
                                                         message: "registered processor p1"))
      registry.register_source(CPM::RegisterSourceRequest.new(source_id: "s1", endpoint: "src:1"))
      registry.register_consumer(CPM::RegisterConsumerRequest.new(consumer_id: "c1"))

      list = registry.components
      expect(list.map { |c| [c.kind, c.id] }).to eq([[:processor, "p1"], [:source, "s1"], [:consumer, "c1"]])
      p1 = list.first
      expect([p1.endpoint, p1.metadata, p1.status, p1.metrics]).to eq(["10.0.0.1:9000", { "zone" => "a" }, "STARTING", {}])
      expect([p1.registered_at, p1.last_heartbeat, p1.stale?]).to eq([clock.now, clock.now, false])
      expect(p1).to be_frozen
      expect(registry.components(kind: :source).map(&:id)).to eq(["s1"])
      expect { registry.components(kind: :sink) }.to raise_error(ArgumentError, /kind must be one of/)
    end

    it "assigns an id when the request has none, different each time" do
      a = registry.register_processor(CPM::RegisterProcessorRequest.new(endpoint: "x:1"))
      b = registry.register_consumer(CPM::RegisterConsumerRequest.new)
      expect(a.processor_id).to match(/\Aprocessor-\h{8}\z/)
      expect(b.consumer_id).to match(/\Aconsumer-\h{8}\z/)
      expect(a.success && b.success).to be(true)
      expect(registry.component(:processor, a.processor_id).endpoint).to eq("x:1")
    end

    it "re-registration updates the endpoint and metadata and keeps registered_at" do
      registry.register_processor(CPM::RegisterProcessorRequest.new(processor_id: "p1", endpoint: "old:1"))
      first = clock.now
      clock.advance(10)
      r = registry.register_processor(CPM::RegisterProcessorRequest.new(processor_id: "p1", endpoint: "new:2",
                                                                        metadata: { "v" => "2" }))
      expect(r.message).to eq("re-registered processor p1")
      c = registry.component(:processor, "p1")
      expect([c.endpoint, c.metadata, c.registered_at, c.last_heartbeat]).to eq(["new:2", { "v" => "2" }, first, clock.now])
      expect(registry.size).to eq(1)
    end

    it "keeps one namespace of ids: registering an id as another kind replaces it, and a heartbeat of the wrong kind is refused" do
      registry.register_processor(CPM::RegisterProcessorRequest.new(processor_id: "same"))
      registry.register_source(CPM::RegisterSourceRequest.new(source_id: "same"))
      expect(registry.components.map { |c| [c.kind, c.id] }).to eq([%i[source] + ["same"]])
      expect(registry.consumer_heartbeat(CPM::ConsumerHeartbeatRequest.new(consumer_id: "same")).success).to be(false)
      expect(registry.source_heartbeat(CPM::SourceHeartbeatRequest.new(source_id: "same")).success).to be(true)
      expect(registry.component(:processor, "same")).to be_nil
      expect(registry.component("same").kind).to eq(:source)
    end
  end

  describe "heartbeats" do
    it "records status, metrics, the reported timestamp and the time it arrived" do
      registry.register_source(CPM::RegisterSourceRequest.new(source_id: "s1"))
      clock.advance(5)
      sent = Time.at(1_699_999_999, 250_000, :usec)
      r = registry.source_heartbeat(CPM::SourceHeartbeatRequest.new(source_id: "s1", status: "HEALTHY", timestamp: sent,
                                                                    metrics: { "events" => 12.0, "lag" => 0.5 }))
      expect(r).to eq(CPM::SourceHeartbeatResponse.new(success: true, message: "heartbeat recorded"))
      c = registry.component(:source, "s1")
      expect([c.status, c.metrics, c.last_heartbeat, c.heartbeats]).to eq(["HEALTHY", { "events" => 12.0, "lag" => 0.5 }, clock.now, 1])
      expect(c.reported_at).to eq(sent)
    end

    it "keeps the previous status when a heartbeat sends none" do
      registry.register_consumer(CPM::RegisterConsumerRequest.new(consumer_id: "c1"))
      registry.consumer_heartbeat(CPM::ConsumerHeartbeatRequest.new(consumer_id: "c1", status: "UNHEALTHY"))
      registry.consumer_heartbeat(CPM::ConsumerHeartbeatRequest.new(consumer_id: "c1"))
      expect(registry.component(:consumer, "c1").status).to eq("UNHEALTHY")
    end

    it "answers success: false with a message for a component it does not know" do
      %i[processor source consumer].each do |kind|
        cap = kind.to_s.capitalize
        req = CPM.const_get(:"#{cap}HeartbeatRequest").new("#{kind}_id": "ghost", status: "HEALTHY")
        r = registry.public_send(:"#{kind}_heartbeat", req)
        expect(r.success).to be(false)
        expect(r.message).to eq("unknown #{kind} \"ghost\": not registered with this control plane, register first")
      end
      expect(registry.components).to be_empty
    end
  end

  describe "staleness" do
    it "marks a component stale after its TTL without a heartbeat, and fresh again after one" do
      registry.register_processor(CPM::RegisterProcessorRequest.new(processor_id: "p1"))
      clock.advance(30)
      expect(registry.component(:processor, "p1").stale?).to be(false)
      clock.advance(0.5)
      expect(registry.component(:processor, "p1").stale?).to be(true)
      expect(registry.stale_components.map(&:id)).to eq(["p1"])
      registry.processor_heartbeat(CPM::ProcessorHeartbeatRequest.new(processor_id: "p1", status: "HEALTHY"))
      expect(registry.component(:processor, "p1").stale?).to be(false)
    end

    it "prunes stale components on request" do
      registry.register_processor(CPM::RegisterProcessorRequest.new(processor_id: "old"))
      clock.advance(31)
      registry.register_processor(CPM::RegisterProcessorRequest.new(processor_id: "new"))
      expect(registry.prune.map(&:id)).to eq(["old"])
      expect(registry.components.map(&:id)).to eq(["new"])
      expect(registry.remove(:processor, "new")).to be(true)
      expect(registry.remove(:processor, "new")).to be(false)
    end

    it "refuses a ttl that is not a positive number" do
      expect { described_class.new(ttl: 0) }.to raise_error(ArgumentError, /ttl/)
      expect { described_class.new(ttl: "30") }.to raise_error(ArgumentError, /ttl/)
    end
  end

  it "prints a table of the components" do
    registry.register_processor(CPM::RegisterProcessorRequest.new(processor_id: "p1", endpoint: "h:1"))
    registry.processor_heartbeat(CPM::ProcessorHeartbeatRequest.new(processor_id: "p1", status: "HEALTHY",
                                                                    metrics: { "n" => 3.0 }))
    registry.register_source(CPM::RegisterSourceRequest.new(source_id: "s1"))
    clock.advance(40)
    registry.source_heartbeat(CPM::SourceHeartbeatRequest.new(source_id: "s1"))
    lines = registry.table.lines.map(&:rstrip)
    expect(lines[0].split).to eq(%w[KIND PROTOCOL ID ENDPOINT STATUS LAST_HEARTBEAT METRICS])
    expect(lines[1].split).to eq(["processor", "seed", "p1", "h:1", "HEALTHY", "(stale)", "40.0s", "ago", "n=3"])
    expect(lines[2].split).to eq(["source", "seed", "s1", "-", "STARTING", "0.0s", "ago", "-"])
    expect(described_class.new(janitor_interval: nil).table).to eq("(no components registered)")
  end

  it "is safe to use from many threads at once" do
    per_thread = ENV["GC_STRESS"] ? 5 : 50 # #components copies every entry: quadratic under GC.stress
    threads = 8.times.map do |t|
      Thread.new do
        per_thread.times do |i|
          id = "p#{t}-#{i}"
          registry.register_processor(CPM::RegisterProcessorRequest.new(processor_id: id))
          registry.processor_heartbeat(CPM::ProcessorHeartbeatRequest.new(processor_id: id, status: "HEALTHY"))
          registry.components
        end
      end
    end
    threads.each(&:join)
    expect(registry.size).to eq(8 * per_thread)
    expect(registry.components.map(&:heartbeats).uniq).to eq([1])
  end

  describe "served over gRPC (official client)" do
    before(:all) { Official.load! }

    it "implements all six RPCs" do
      server = Flowctl::Server.new(port: 0, tls: false)
      server.handle(CPM::Service, registry)
      port = server.start
      oc = Obsrvr::Flow::Controlplane
      stub = oc::ControlPlane::Stub.new("127.0.0.1:#{port}", :this_channel_is_insecure)
      expect(stub.register_processor(oc::RegisterProcessorRequest.new(processor_id: "p", endpoint: "e:1")).processor_id).to eq("p")
      expect(stub.register_source(oc::RegisterSourceRequest.new(source_id: "s")).source_id).to eq("s")
      cid = stub.register_consumer(oc::RegisterConsumerRequest.new).consumer_id
      expect(cid).to start_with("consumer-")
      ts = Google::Protobuf::Timestamp.new(seconds: 1_700_000_000, nanos: 5_000)
      expect(stub.processor_heartbeat(oc::ProcessorHeartbeatRequest.new(processor_id: "p", status: "HEALTHY",
                                                                        metrics: { "x" => 1.5 }, timestamp: ts)).success).to be(true)
      expect(stub.source_heartbeat(oc::SourceHeartbeatRequest.new(source_id: "s")).success).to be(true)
      expect(stub.consumer_heartbeat(oc::ConsumerHeartbeatRequest.new(consumer_id: "nope")).success).to be(false)
      expect(stub.consumer_heartbeat(oc::ConsumerHeartbeatRequest.new(consumer_id: cid)).success).to be(true)
      p = registry.component(:processor, "p")
      expect([p.status, p.metrics, p.endpoint]).to eq(["HEALTHY", { "x" => 1.5 }, "e:1"])
      expect(p.reported_at).to eq(Time.at(1_700_000_000, 5_000, :nsec))
      expect(registry.components.map(&:kind)).to eq(%i[processor source consumer])
    ensure
      server&.stop
    end
  end
end
