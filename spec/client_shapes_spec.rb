# frozen_string_literal: true

require "spec_helper"

# Server streaming and client streaming calls of a Flowctl client against a server built
# with the official grpc gem (Shapes: one RPC of each shape on the seed's DataMessage):
# replies, call objects, metadata, status errors, deadlines, cancellation, interrupts,
# flow control both ways, and exceptions of a request Enumerable.
RSpec.describe "Flowctl client: server streaming and client streaming against the official grpc gem" do
  # flow control needs thousands of messages in flight: too slow with GC.stress on (checked in normal runs)
  stressed = ENV["GC_STRESS"] == "1" && "thousands of messages under GC.stress"
  Official.load!
  include Shapes::SpecHelpers

  before(:all) do
    @state = {}
    @server = Shapes::OfficialServer.new(Shapes.scripted(@state, Shapes::Echo.official), pool_size: 30)
    @port = @server.start
  end

  after(:all) { @server&.stop }

  before { @state.clear }

  let(:client) { Shapes.client("127.0.0.1:#{@port}") }

  after { client.close }

  # A thread blocked in the block; returns it once `ready` (a Queue) has an item.
  def blocked(ready)
    t = Thread.new do
      Thread.current.report_on_exception = false
      yield
    end
    expect(pop(ready)).not_to be_nil
    sleep 0.05
    t
  end

  describe "server streaming" do
    it "yields every reply and returns the finished call" do
      got = []
      call = client.server_stream(payload: "hi", metadata: {"count" => "3"}) { |r| got << r }
      expect(got).to eq([0, 1, 2].map { |i| dm.new(payload: "hi", metadata: {"i" => i.to_s}) })
      expect(call).to be_a(Flowctl::ServerStreamCall)
      expect(call).to be_finished
      expect(call.status).to eq(0)
      expect(client.server_stream(dm.new(metadata: {"count" => "0"})) { raise "no reply expected" }.status).to eq(0)
    end

    it "returns an Enumerator without a block: the call starts when it is iterated, each time" do
      started = Queue.new
      behave(:server_stream) do |req, _call, &y|
        started << true
        2.times { |i| y.call(om.new(payload: req.payload, metadata: {"i" => i.to_s})) }
      end
      e = client.server_stream(payload: "e")
      expect(e).to be_a(Enumerator)
      sleep 0.1
      expect(started).to be_empty
      expect(e.map { |r| r.metadata["i"] }).to eq(%w[0 1])
      expect(e.first.payload).to eq("e")
      expect(e.next.metadata["i"]).to eq("0")
      expect(started.size).to eq(3)
    end

    it "checks the request when called, not when iterated" do
      expect { client.server_stream(nope: 1) }.to raise_error(ArgumentError, /nope/)
      expect { client.server_stream(payload: 5) }.to raise_error(TypeError, /payload/)
      expect { client.server_stream(42) }.to raise_error(TypeError, /DataMessage/)
      expect { client.server_stream(msg(1), payload: "x") }.to raise_error(ArgumentError, /not both/)
      expect { client.server_stream(msg(1), timeout: -1) }.to raise_error(ArgumentError, /timeout/)
      expect { client.server_stream(msg(1), headers: {"Bad Key" => "v"}) }.to raise_error(ArgumentError)
    end

    it "gives a call object: read, each, metadata both ways, no write" do
      behave(:server_stream) do |req, call, &y|
        call.merge_metadata_to_send("x-initial" => call.metadata["x-req"])
        call.output_metadata["x-trailing-bin"] = "\x00\x01".b
        y.call(req)
        y.call(req)
      end
      call = client.server_stream_stream(msg(7), headers: {"x-req" => "hello"})
      expect(call).not_to respond_to(:write)
      expect(call).not_to respond_to(:close_write)
      expect(call.initial_metadata).to include("x-initial" => "hello")
      expect(call.read).to eq(msg(7))
      expect(call.each.to_a).to eq([msg(7)])
      expect(call.read).to be_nil
      expect(call.trailing_metadata).to include("x-trailing-bin" => "\x00\x01".b)
      expect(call.status).to eq(0)
    end

    it "raises the status after the replies sent before it, with details and trailing metadata" do
      got = []
      expect { client.server_stream(payload: "x", metadata: {"count" => "2", "fail" => "5"}) { |r| got << r } }
        .to raise_error(Flowctl::NotFound, /failed after 2/)
      expect(got.size).to eq(2)
      call = client.server_stream_stream(payload: "x", metadata: {"count" => "1", "fail" => "7"})
      expect(call.read).to be_a(dm)
      expect { call.read }.to raise_error(Flowctl::PermissionDenied)
      expect { call.read }.to raise_error(Flowctl::PermissionDenied)
      expect(call.error).to be_a(Flowctl::PermissionDenied)
      expect(call.details).to eq("failed after 1")
    end

    it "ends with DeadlineExceeded at the call's deadline, not the client's unary default" do
      behave(:server_stream) do |req, _call, &y|
        y.call(req)
        sleep 3
      end
      slow = Shapes.client("127.0.0.1:#{@port}", timeout: 0.05)
      got = []
      within(2) do
        expect { slow.server_stream(msg(1), timeout: 0.5) { |r| got << r } }.to raise_error(Flowctl::DeadlineExceeded)
      end
      expect(got).to eq([msg(1)])
      slow.close
    end

    it "cancels the call when the block leaves early; the server's writes stop" do
      ended = Queue.new
      behave(:server_stream) do |req, _call, &y|
        i = 0
        loop { y.call(om.new(payload: req.payload, metadata: {"i" => (i += 1).to_s})) }
      ensure
        ended << i
      end
      first = client.server_stream(msg(0)) { |r| break r }
      expect(first.metadata["i"]).to eq("1")
      expect(pop(ended)).to be_a(Integer)
      e = client.server_stream(msg(0))
      expect(e.take(3).map { |r| r.metadata["i"] }).to eq(%w[1 2 3])
      expect(pop(ended)).to be_a(Integer)
    end

    it "returns at once from a blocked read on Thread#raise and on cancel from another thread" do
      arrived = Queue.new
      behave(:server_stream) do |_req, _call|
        arrived << true
        sleep 3
      end
      interrupt = Class.new(StandardError)
      t = blocked(arrived) { client.server_stream(msg(1)) { nil } }
      within(1) do
        t.raise(interrupt, "stop")
        expect { t.value }.to raise_error(interrupt, "stop")
      end
      call = client.server_stream_stream(msg(1))
      t = blocked(arrived) { call.read }
      within(1) do
        call.cancel
        expect { t.value }.to raise_error(Flowctl::Cancelled)
      end
      @state.clear
      expect(client.server_stream(payload: "ok", metadata: {"count" => "1"}).to_a.size).to eq(1)
    end

    it "releases the GVL while it waits (server streaming read, client streaming response)" do
      arrived = Queue.new
      behave(:server_stream) do |req, _call, &y|
        arrived << true
        sleep 1.5
        y.call(req)
      end
      behave(:client_stream) do |reqs, _call|
        reqs.each { nil }
        arrived << true
        sleep 1.5
        om.new(payload: "late")
      end
      [-> { client.server_stream(msg(1)).to_a.size }, -> { client.client_stream([msg(1)]).payload }].each do |waiting|
        t = Thread.new(&waiting)
        expect(pop(arrived)).to be(true)
        t0 = now
        spins = 0
        spins += 1 while now - t0 < 0.3 # Ruby runs here while t waits for its reply
        expect(t).to be_alive
        expect(spins).to be > 1000
        expect(t.value).to eq(1).or eq("late")
      end
    end

    it "reads ahead a bounded amount for a slow reader: the server's writes wait (flow control)", skip: stressed do
      sent = Queue.new
      behave(:server_stream) do |_req, _call, &y|
        big = om.new(payload: "x" * 1024)
        100_000.times do |i|
          y.call(big)
          sent << i
        end
      end
      call = client.server_stream_stream(msg(1))
      expect(call.read.payload.bytesize).to eq(1024)
      sleep 1 # the client reads nothing meanwhile
      behind = sent.size
      # the client's read-ahead (64 messages) and HTTP/2 windows: a few MB at most
      expect(behind).to be < 20_000
      50.times { call.read }
      call.cancel
      expect(behind).to be > 10
    end
  end

  describe "client streaming" do
    it "sends an Enumerable of requests (objects or Hashes) and returns the response" do
      reqs = [msg(1, "a"), {payload: "b"}, dm.new(payload: "c")]
      expect(client.client_stream(reqs)).to eq(dm.new(payload: "abc", metadata: {"count" => "3"}))
      expect(client.client_stream([])).to eq(dm.new(metadata: {"count" => "0"}))
      lazy = (1..500).lazy.map { |i| msg(i, "x" * 1024) }
      expect(client.client_stream(lazy).metadata["count"]).to eq("500")
      expect { client.client_stream(42) }.to raise_error(TypeError, /Enumerable/)
    end

    it "gives a call object: write/<<, close_write, response (and read), metadata" do
      behave(:client_stream) do |reqs, call|
        call.merge_metadata_to_send("x-initial" => "i")
        call.output_metadata["x-trailing"] = "t"
        om.new(payload: reqs.map(&:payload).join, metadata: {"h" => call.metadata["x-req"].to_s})
      end
      call = client.client_stream_stream(headers: {"x-req" => "r"})
      expect(call).not_to respond_to(:each)
      expect(call.write(msg(1, "a"))).to be(call)
      call << msg(2, "b") << {payload: "c"}
      expect(call.close_write).to be(call)
      expect { call << msg(3) }.to raise_error(IOError, /close_write/)
      expect(call.response).to eq(dm.new(payload: "abc", metadata: {"h" => "r"}))
      expect(call.read).to equal(call.response)
      expect(call.initial_metadata).to include("x-initial" => "i")
      expect(call.trailing_metadata).to include("x-trailing" => "t")
      expect(call.status).to eq(0)
      # response half-closes by itself
      call = client.client_stream_stream
      call << msg(1, "z")
      expect(call.response.payload).to eq("z")
    end

    it "raises the server's status; an early one stops the writing of an endless Enumerable" do
      expect { client.client_stream([msg(1), dm.new(metadata: {"fail" => "9"}), msg(2)]) }
        .to raise_error(Flowctl::FailedPrecondition, /failed at request 1/)
      written = 0
      endless = Enumerator.new do |y|
        y << dm.new(metadata: {"fail" => "3"})
        loop { y << msg(written += 1) }
      end
      within(3) { expect { client.client_stream(endless) }.to raise_error(Flowctl::InvalidArgument) }
      call = client.client_stream_stream
      call << dm.new(metadata: {"fail" => "5"})
      expect { call.response }.to raise_error(Flowctl::NotFound)
      expect(call.error).to be_a(Flowctl::NotFound)
    end

    it "returns the response of a server that answers before reading every request" do
      behave(:client_stream) { |reqs, _call| om.new(payload: reqs.first.payload) }
      endless = Enumerator.new { |y| i = 0; loop { y << msg(i += 1, "q") } }
      expect(within(3) { client.client_stream(endless) }).to eq(dm.new(payload: "q"))
      # before the first request went out (the official gem's own client waits for its deadline there)
      behave(:client_stream) { |_reqs, _call| om.new(payload: "early") }
      late = Enumerator.new do |y|
        sleep 0.2
        y << msg(1)
      end
      expect(within(3) { client.client_stream(late, timeout: 5) }).to eq(dm.new(payload: "early"))
    end

    it "cancels the call and raises what the Enumerable raises (any exception, IOError too)" do
      ended = Queue.new
      behave(:client_stream) do |reqs, _call|
        reqs.each { nil }
        om.new
      ensure
        ended << true # without a cancel, it would wait for more requests
      end
      [IOError, RuntimeError, Flowctl::NotFound].each do |klass|
        boom = Enumerator.new do |y|
          y << msg(1)
          raise klass, "from the requests"
        end
        expect { client.client_stream(boom) }.to raise_error(klass, /from the requests/)
        expect(pop(ended)).not_to be_nil # the server saw the call end (cancelled)
      end
      expect { client.client_stream([msg(1), 42]) }.to raise_error(TypeError, /given Integer/)
      expect(pop(ended)).not_to be_nil
      @state.clear
      expect(client.client_stream([msg(1)]).metadata["count"]).to eq("1")
    end

    it "ends with DeadlineExceeded at the call's deadline" do
      slow = Enumerator.new do |y|
        loop do
          y << msg(1)
          sleep 0.05
        end
      end
      within(3) { expect { client.client_stream(slow, timeout: 0.3) }.to raise_error(Flowctl::DeadlineExceeded) }
      behave(:client_stream) do |reqs, _call|
        reqs.each { nil }
        sleep 2
        om.new
      end
      call = client.client_stream_stream(timeout: 0.2)
      call << msg(1)
      within(3) { expect { call.response }.to raise_error(Flowctl::DeadlineExceeded) }
    end

    it "holds the writer back while the server does not read (flow control), and Thread#raise frees it", skip: stressed do
      reading = Queue.new
      behave(:client_stream) do |reqs, _call|
        reading << true
        sleep 3
        reqs.each { nil }
        om.new
      end
      made = 0
      endless = Enumerator.new { |y| loop { y << msg(made += 1, "x" * 1024) } }
      t = blocked(reading) { client.client_stream(endless) }
      sleep 0.5
      expect(t).to be_alive
      stuck = made
      expect(stuck).to be < 20_000 # 1 KiB each: the send queue and HTTP/2 windows, a few MB at most
      interrupt = Class.new(StandardError)
      within(1) do
        t.raise(interrupt)
        expect { t.value }.to raise_error(interrupt)
      end
      expect(made).to be < stuck + 100
    end
  end

  describe "bidi request Enumerable" do
    it "raises an IOError or RPCError of the Enumerable itself (and cancels) instead of waiting forever" do
      [IOError, Flowctl::Unavailable].each do |klass|
        boom = Enumerator.new do |y|
          y << msg(1)
          raise klass, "enum failed"
        end
        got = []
        within(3) { expect { client.bidi(boom, timeout: 5) { |r| got << r } }.to raise_error(klass, /enum failed/) }
      end
    end
  end

  it "refuses an RPC whose method would replace a client's own" do
    svc = Flowctl::Service.new("flowctl.test.Clash", [["Close", Shapes::MSG, Shapes::MSG, :server_streaming]])
    expect { Class.new(Flowctl::Client) { use_service svc } }.to raise_error(ArgumentError, /close/)
    svc = Flowctl::Service.new("flowctl.test.Clash", [["CallHeaders", Shapes::MSG, Shapes::MSG, :unary]])
    expect { Class.new(Flowctl::Client) { use_service svc } }.to raise_error(ArgumentError, /call_headers/)
  end
end
