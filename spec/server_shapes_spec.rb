# frozen_string_literal: true

require "spec_helper"

# Flowctl::Server serving server streaming and client streaming RPCs (Shapes: one RPC of
# each shape), driven by the official grpc gem's client and by this gem's: the handler
# forms, handler exceptions, deadlines, cancellation and flow control; and all four shapes
# between every pairing of the two gems.
RSpec.describe "Flowctl::Server: server streaming and client streaming" do
  # flow control needs thousands of messages in flight: too slow with GC.stress on (checked in normal runs)
  stressed = ENV["GC_STRESS"] == "1" && "thousands of messages under GC.stress"
  Official.load!
  include Shapes::SpecHelpers

  before(:all) do
    @state = {}
    @server = Flowctl::Server.new(port: 0, tls: false, pool_size: 16)
    @server.handle(Shapes.service, Shapes.scripted(@state, Shapes::Echo.flowctl))
    @port = @server.start
  end

  after(:all) { @server&.stop(grace: 1) }

  before { @state.clear }

  let(:client) { Shapes.client("127.0.0.1:#{@port}") }
  let(:stub) { Shapes.official_stub(@port) }

  after { client.close }

  # The four shapes through one client kind against the server on port, with Echo's behaviour.
  def four_shapes(kind, port)
    if kind == :official
      s = Shapes.official_stub(port)
      [s.unary(om.new(payload: "u")).payload,
       s.server_stream(om.new(payload: "s", metadata: {"count" => "3"})).map { |m| m.metadata["i"] },
       s.client_stream([om.new(payload: "a"), om.new(payload: "b")]).to_h,
       s.bidi([om.new(payload: "x"), om.new(payload: "y")]).map(&:payload)]
    else
      c = Shapes.client("127.0.0.1:#{port}")
      begin
        [c.unary(payload: "u").payload,
         c.server_stream(payload: "s", metadata: {"count" => "3"}).map { |m| m.metadata["i"] },
         c.client_stream([dm.new(payload: "a"), dm.new(payload: "b")]).to_h,
         c.bidi([dm.new(payload: "x"), dm.new(payload: "y")]).map(&:payload)]
      ensure
        c.close
      end
    end
  end

  it "serves all four shapes to both gems' clients, and this gem's client calls the official server" do
    expected = ["u", %w[0 1 2], {payload: "ab", metadata: {"count" => "2"}}, %w[x y]]
    expect(four_shapes(:official, @port)).to eq(expected)
    expect(four_shapes(:flowctl, @port)).to eq(expected)
    official = Shapes::OfficialServer.new(Shapes::Echo.official)
    begin
      expect(four_shapes(:flowctl, official.start)).to eq(expected)
    ensure
      official.stop
    end
  end

  describe "server streaming handlers" do
    it "send what they yield and call.write / <<, in that order; what they return then is not sent" do
      behave(:server_stream) do |req, call, &y|
        y.call(dm.new(payload: "#{req.payload}1"))
        call.write(payload: "#{req.payload}2")
        call << dm.new(payload: "#{req.payload}3")
        [{payload: "#{req.payload}4"}, dm.new(payload: "#{req.payload}5")]
      end
      expect(stub.server_stream(om.new(payload: "o")).map(&:payload)).to eq(%w[o1 o2 o3])
      expect(client.server_stream(payload: "f").map(&:payload)).to eq(%w[f1 f2 f3])
    end

    it "send a returned Enumerable when they sent nothing else, and the rows of `rows.each { yield }` only once" do
      behave(:server_stream) { |req, _call| [{payload: "#{req.payload}1"}, dm.new(payload: "#{req.payload}2")].each }
      expect(client.server_stream(payload: "e").map(&:payload)).to eq(%w[e1 e2])
      behave(:server_stream) { |_req, _call| [] }
      expect(client.server_stream(payload: "n").to_a).to eq([])
      behave(:server_stream) do |req, _call, &y|
        rows = [{p: "a"}, {p: "b"}]
        rows.each { |r| y.call(dm.new(payload: req.payload + r[:p])) } # returns rows: Hashes no reply has
      end
      expect(stub.server_stream(om.new(payload: "o")).map(&:payload)).to eq(%w[oa ob])
      expect(client.server_stream(payload: "f").map(&:payload)).to eq(%w[fa fb])
    end

    it "send nothing more for a returned message, Hash or the request (the last value of a loop)" do
      [->(req) { req }, ->(_req) { dm.new(payload: "z") }, ->(_req) { {payload: "h"} }, ->(_req) { nil }].each do |ret|
        behave(:server_stream) do |req, _call, &y|
          y.call(req)
          ret.call(req)
        end
        expect(client.server_stream(payload: "r").map(&:payload)).to eq(["r"])
      end
    end

    it "may take the request only (one-argument method)" do
      handler = Object.new
      def handler.server_stream(req) = Array.new(2) { |i| {payload: req.payload * (i + 1)} }
      server = Flowctl::Server.new(port: 0, tls: false, pool_size: 2).handle(Shapes.service, handler)
      port = server.start
      expect(Shapes.official_stub(port).server_stream(om.new(payload: "a")).map(&:payload)).to eq(%w[a aa])
    ensure
      server&.stop(grace: 0.5)
    end

    it "end with the status of what they raise, after the replies sent before; the server keeps serving" do
      behave(:server_stream) do |req, call, &y|
        y.call(req)
        call.trailing_metadata = {"x-why" => "because"}
        raise Flowctl::ResourceExhausted.new("too much", metadata: {"x-more" => "1"}) if req.payload == "rpc"
        raise ArgumentError, "plain" if req.payload == "plain"

        y.call(42)
      end
      got = []
      expect { client.server_stream(payload: "rpc") { |r| got << r } }.to raise_error(Flowctl::ResourceExhausted) { |e|
        expect(e.details).to eq("too much")
        expect(e.metadata).to include("x-why" => "because", "x-more" => "1")
      }
      expect(got.map(&:payload)).to eq(["rpc"])
      expect { client.server_stream(payload: "plain").to_a }.to raise_error(Flowctl::Unknown, /ArgumentError: plain/)
      expect { stub.server_stream(om.new(payload: "bad")).to_a }.to raise_error(GRPC::Internal, /DataMessage/)
      @state.clear
      expect(client.server_stream(payload: "ok", metadata: {"count" => "1"}).to_a.size).to eq(1)
    end

    it "see the client's deadline; their writes fail once it passed" do
      seen = Queue.new
      behave(:server_stream) do |req, call, &y|
        seen << call.deadline
        loop do
          y.call(req)
          sleep 0.02
        end
      rescue Flowctl::Cancelled => e
        seen << e
        raise
      end
      t0 = Time.now
      got = 0
      within(3) do
        expect { client.server_stream(msg(1), timeout: 0.3) { got += 1 } }.to raise_error(Flowctl::DeadlineExceeded)
      end
      expect(pop(seen)).to be_within(0.2).of(t0 + 0.3)
      expect(pop(seen)).to be_a(Flowctl::Cancelled)
      expect(got).to be > 1
    end

    it "see the call cancelled when the client leaves early (both gems' clients)" do
      ended = Queue.new
      behave(:server_stream) do |req, call, &y|
        loop { y.call(req) }
      rescue Flowctl::Cancelled
        ended << call.cancelled?
        raise
      end
      expect(client.server_stream(msg(1)).first(2).size).to eq(2)
      expect(pop(ended)).to be(true)
      op = stub.server_stream(om.new(payload: "o"), return_op: true)
      replies = op.execute
      expect(replies.first.payload).to eq("o")
      op.cancel
      expect(pop(ended)).to be(true)
    end

    it "wait in call.write while the client reads slowly: flow control bounds what is buffered", skip: stressed do
      sent = Queue.new
      ended = Queue.new
      behave(:server_stream) do |_req, call|
        big = dm.new(payload: "x" * 1024)
        100_000.times do |i|
          call << big
          sent << i
        end
      ensure
        ended << sent.size
      end
      call = client.server_stream_stream(msg(1))
      expect(call.read.payload.bytesize).to eq(1024)
      sleep 1
      behind = sent.size
      expect(behind).to be < 20_000 # send queue, read-ahead and HTTP/2 windows: a few MB at most
      expect(behind).to be > 10
      call.cancel
      expect(pop(ended)).to be < 20_000
    end
  end

  describe "client streaming handlers" do
    it "return the response or a Hash of its fields, after reading all, some or none of the requests" do
      expect(stub.client_stream([om.new(payload: "a"), om.new(payload: "b")]).payload).to eq("ab")
      expect(client.client_stream([]).metadata).to eq("count" => "0")
      behave(:client_stream) { |reqs, _call| {payload: reqs.first(2).map(&:payload).join} }
      endless = Enumerator.new { |y| i = 0; loop { y << msg(i += 1, i.to_s) } }
      expect(within(3) { client.client_stream(endless) }.payload).to eq("12")
      # (reads one first: the official client waits for its deadline when a server answers
      # before its first request went out, whichever gem serves; this gem's client does not)
      behave(:client_stream) { |reqs, call| reqs.first && {payload: call.metadata["x-h"]} }
      expect(stub.client_stream([om.new], metadata: {"x-h" => "v"}).payload).to eq("v")
      behave(:client_stream) { |_reqs, _call| {payload: "early"} }
      late = Enumerator.new do |y|
        sleep 0.2
        y << msg(1)
      end
      expect(within(3) { client.client_stream(late, timeout: 5) }.payload).to eq("early")
    end

    it "end with the status of what they raise; a write on a client streaming call is refused" do
      behave(:client_stream) do |reqs, call|
        reqs.each { |r| raise Flowctl::Aborted, "at #{r.payload}" if r.payload == "stop" }
        call.write(dm.new)
      end
      endless = Enumerator.new { |y| y << msg(1, "stop"); loop { y << msg(2) } }
      within(3) { expect { client.client_stream(endless) }.to raise_error(Flowctl::Aborted, /at stop/) }
      expect { stub.client_stream([om.new(payload: "stop")]) }.to raise_error(GRPC::Aborted)
      expect { client.client_stream([msg(1)]) }.to raise_error(Flowctl::Unknown, /client_streaming: return the response/)
      behave(:client_stream) { |_reqs, _call| 42 }
      expect { client.client_stream([msg(1)]) }.to raise_error(Flowctl::Internal, /Integer/)
      behave(:client_stream) { |_reqs, _call| nil }
      expect { stub.client_stream([om.new]) }.to raise_error(GRPC::Internal, /NilClass/)
    end

    it "see a cancelled or timed out client as Flowctl::Cancelled from the requests" do
      ended = Queue.new
      behave(:client_stream) do |reqs, _call|
        reqs.each { nil }
        dm.new
      rescue Flowctl::Cancelled => e
        ended << e
        raise
      end
      slow = Enumerator.new do |y|
        loop do
          y << msg(1)
          sleep 0.02
        end
      end
      within(3) { expect { client.client_stream(slow, timeout: 0.2) }.to raise_error(Flowctl::DeadlineExceeded) }
      expect(pop(ended)).to be_a(Flowctl::Cancelled)
      call = client.client_stream_stream
      call << msg(1)
      sleep 0.1
      call.cancel
      expect(pop(ended)).to be_a(Flowctl::Cancelled)
    end

    it "read ahead a bounded amount: a client writing to a handler that does not read waits", skip: stressed do
      reading = Queue.new
      behave(:client_stream) do |reqs, _call|
        reading << true
        sleep 3
        reqs.first
      end
      made = 0
      endless = Enumerator.new { |y| loop { y << msg(made += 1, "x" * 1024) } }
      t = Thread.new do
        Thread.current.report_on_exception = false
        client.client_stream(endless)
      end
      expect(pop(reading)).to be(true)
      sleep 0.5
      expect(t).to be_alive
      expect(made).to be < 20_000
      t.raise(Interrupt)
      expect { t.value }.to raise_error(Interrupt)
    end
  end
end

RSpec.describe "Server and client streams of this gem on both sides, through GC.compact" do
  include Shapes::SpecHelpers

  it "keep working when the heap is compacted while they are open (and under GC_STRESS=1)" do
    server = Flowctl::Server.new(port: 0, tls: false, pool_size: 4).handle(Shapes.service, Shapes::Echo.flowctl)
    client = Shapes.client("127.0.0.1:#{server.start}")
    reading = client.server_stream_stream(payload: "r", metadata: {"count" => "4"})
    writing = client.client_stream_stream(headers: {"x-h" => "v"})
    writing << msg(1, "a")
    expect(reading.read.metadata).to eq("i" => "0")
    GC.compact if GC.respond_to?(:compact)
    writing << msg(2, "b")
    expect(reading.map { |m| m.metadata["i"] }).to eq(%w[1 2 3])
    expect(writing.response).to eq(dm.new(payload: "ab", metadata: {"count" => "2"}))
    GC.compact if GC.respond_to?(:compact)
    expect([reading.status, writing.status, reading.trailing_metadata, writing.initial_metadata]).to eq([0, 0, {}, {}])
    expect(client.bidi([msg(1), msg(2)]).map(&:payload)).to eq(%w[p p])
    expect { client.client_stream(Enumerator.new { |y| y << msg(1); raise IOError, "enum" }) }.to raise_error(IOError, "enum")
  ensure
    client&.close
    server&.stop(grace: 1)
  end
end
