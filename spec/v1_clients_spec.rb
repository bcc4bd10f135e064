# frozen_string_literal: true

require "spec_helper"

# The flowctl.v1 clients against servers built with the official grpc gem (its classes
# generated into OfficialFlowctl::V1, spec/gen/official_v1, so Flowctl::V1 stays the gem's):
# StreamEvents (server streaming), Consume (client streaming), Process (bidi), and unary
# RPCs; and the same RPCs served by Flowctl::Server to the official gem's stubs.
RSpec.describe "Flowctl::V1 clients" do
  before(:all) do
    Official.load!
    dir = File.expand_path("gen/official_v1", __dir__)
    $LOAD_PATH.unshift(dir) unless $LOAD_PATH.include?(dir)
    %w[source consumer processor control_plane].each { |f| require "official_flowctl/v1/#{f}_services_pb" }
  end

  def ov = OfficialFlowctl::V1
  def v1 = Flowctl::V1
  def pop(q) = OfficialServer.pop(q, 5)

  # One handler for the official gem's four flowctl.v1 services.
  class OfficialV1Handler
    attr_reader :seen

    def initialize = @seen = Queue.new

    def stream_events(req, call)
      @seen << [req.params.to_h, call.metadata["x-req"]]
      n = Integer(req.params["n"] || 0)
      Array.new(n) do |i|
        OfficialFlowctl::V1::Event.new(id: "e#{i}", type: "t", payload: "p#{i}".b, metadata: {"i" => i.to_s},
                                       timestamp: Google::Protobuf::Timestamp.new(seconds: 1_700_000_000 + i, nanos: 5),
                                       content_type: "text/plain")
      end
    end

    def consume(call)
      events = call.each_remote_read.to_a
      OfficialFlowctl::V1::ConsumeResponse.new(events_consumed: events.size, events_failed: 0,
                                               errors: events.map(&:id).grep(/bad/))
    end

    def process(events, _call) = events.lazy.map { |e| OfficialFlowctl::V1::Event.new(id: e.id, type: "#{e.type}.out", payload: e.payload) }

    def get_info(_empty, _call) = OfficialFlowctl::V1::ComponentInfo.new(id: "c1", name: "official", type: :COMPONENT_TYPE_SOURCE)

    def register_component(req, _call)
      OfficialFlowctl::V1::RegisterResponse.new(service_id: "svc-#{req.component.id}", assigned_topics: ["t1"])
    end
  end

  describe "against the official grpc gem's server" do
    before(:all) do
      @handler = OfficialV1Handler.new
      h = @handler
      @server = GRPC::RpcServer.new(pool_size: 10, poll_period: 0.2)
      @port = @server.add_http2_port("127.0.0.1:0", :this_port_is_insecure)
      {OfficialFlowctl::V1::SourceService => %i[stream_events get_info],
       OfficialFlowctl::V1::ConsumerService => %i[consume],
       OfficialFlowctl::V1::ProcessorService => %i[process],
       OfficialFlowctl::V1::ControlPlaneService => %i[register_component]}.each do |mod, names|
        klass = Class.new(mod::Service)
        names.each { |n| klass.define_method(n, &h.method(n)) } # the arity the grpc gem checks
        @server.handle(klass.new)
      end
      @thread = Thread.new { @server.run }
      @server.wait_till_running(10) or raise "official server did not start"
    end

    after(:all) do
      @server&.stop
      @thread&.join(5)
    end

    let(:target) { "127.0.0.1:#{@port}" }

    it "StreamEvents: yields Events (an Enumerator without a block, a call object with _stream)" do
      source = v1::SourceClient.new(target, tls: false)
      events = []
      call = source.stream_events(params: {"n" => "3"}, headers: {"x-req" => "h"}) { |e| events << e }
      expect(call.status).to eq(0)
      expect(pop(@handler.seen)).to eq([{"n" => "3"}, "h"])
      expect(events.map(&:id)).to eq(%w[e0 e1 e2])
      expect(events.first).to be_a(v1::Event)
      expect(events.first.payload).to eq("p0".b)
      expect(events.last.metadata).to eq("i" => "2")
      expect(events.last.timestamp).to eq(Time.at(1_700_000_002, 5, :nsec))
      expect(events.first.content_type).to eq("text/plain")
      expect(source.stream_events(v1::StreamRequest.new(params: {"n" => "2"})).map(&:id)).to eq(%w[e0 e1])
      stream = source.stream_events_stream(params: {"n" => "1"})
      expect(stream.read.id).to eq("e0")
      expect(stream.read).to be_nil
      expect(source.get_info.name).to eq("official")
      expect(source.get_info.type).to eq(:COMPONENT_TYPE_SOURCE)
      source.close
    end

    it "Consume: sends an Enumerable of Events and returns the ConsumeResponse" do
      consumer = v1::ConsumerClient.new(target, tls: false)
      events = [v1::Event.new(id: "a", payload: "x".b), {id: "bad-1"}, v1::Event.new(id: "c", timestamp: Time.now)]
      reply = consumer.consume(events)
      expect(reply).to be_a(v1::ConsumeResponse)
      expect([reply.events_consumed, reply.errors]).to eq([3, ["bad-1"]])
      call = consumer.consume_stream
      call << v1::Event.new(id: "s1") << v1::Event.new(id: "s2")
      expect(call.response.events_consumed).to eq(2)
      consumer.close
    end

    it "Process: writes Events and reads the processed ones (bidi)" do
      processor = v1::ProcessorClient.new(target, tls: false)
      out = processor.process(Array.new(50) { |i| v1::Event.new(id: i.to_s, type: "raw", payload: "p".b) }).to_a
      expect(out.size).to eq(50)
      expect(out.map(&:type).uniq).to eq(["raw.out"])
      expect(out.map(&:id)).to eq((0...50).map(&:to_s))
      processor.close
    end

    it "ControlPlane: a unary RPC" do
      cp = v1::ControlPlaneClient.new(target, tls: false)
      reply = cp.register_component(component: {id: "p1", name: "p", type: :COMPONENT_TYPE_PROCESSOR})
      expect([reply.service_id, reply.assigned_topics]).to eq(["svc-p1", ["t1"]])
      cp.close
    end
  end

  describe "served by Flowctl::Server to the official gem's stubs" do
    before(:all) do
      source = Object.new
      def source.stream_events(req, _call)
        Integer(req.params["n"]).times { |i| yield Flowctl::V1::Event.new(id: "f#{i}", payload: "x".b * i) }
      end
      consumer = Object.new
      def consumer.consume(events, _call)
        n = 0
        events.each { n += 1 }
        {events_consumed: n}
      end
      processor = Object.new
      def processor.process(events, _call) = events.lazy.map { |e| Flowctl::V1::Event.new(id: e.id, type: "done") }
      @server = Flowctl::Server.new(port: 0, tls: false, pool_size: 4)
      @server.handle(Flowctl::V1::SourceService, source)
      @server.handle(Flowctl::V1::ConsumerService, consumer)
      @server.handle(Flowctl::V1::ProcessorService, processor)
      @port = @server.start
    end

    after(:all) { @server&.stop(grace: 1) }

    let(:target) { "127.0.0.1:#{@port}" }

    it "StreamEvents, Consume and Process" do
      src = ov::SourceService::Stub.new(target, :this_channel_is_insecure)
      got = src.stream_events(ov::StreamRequest.new(params: {"n" => "3"})).to_a
      expect(got.map(&:id)).to eq(%w[f0 f1 f2])
      expect(got.last.payload).to eq("xx")
      con = ov::ConsumerService::Stub.new(target, :this_channel_is_insecure)
      expect(con.consume(Array.new(4) { ov::Event.new(id: "c") }).events_consumed).to eq(4)
      pro = ov::ProcessorService::Stub.new(target, :this_channel_is_insecure)
      expect(pro.process([ov::Event.new(id: "1"), ov::Event.new(id: "2")]).map { |e| [e.id, e.type] })
        .to eq([%w[1 done], %w[2 done]])
      # and this gem's own clients
      expect(v1::SourceClient.new(target, tls: false).stream_events(params: {"n" => "2"}).count).to eq(2)
      expect(v1::ConsumerClient.new(target, tls: false).consume([{id: "a"}]).events_consumed).to eq(1)
      expect(v1::ProcessorClient.new(target, tls: false).process([{id: "z"}]).first.type).to eq("done")
    end
  end
end
