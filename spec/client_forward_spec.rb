# frozen_string_literal: true

require "spec_helper"
require "timeout"

# A stream handed straight to another call goes through as bytes (Flowctl::Forwarding,
# ext/flowctl/forward.c): `consumer.consume(processor.process(source.stream_events(req)))`.
# Every example runs the same wiring forwarded and not forwarded (the requests given as
# `.lazy`, an Enumerable like any other) and expects the same outcome.
RSpec.describe "Flowctl forwarding (a call's replies as another call's requests)" do
  v1 = Flowctl::V1

  # What the three handlers do and saw; one instance per server.
  class ForwardSpecHandlers
    attr_reader :seen

    # fwdspec.v1.Raw: bytes at the field numbers of an Event's id, metadata, timestamp, stellar_cursor.
    def self.raw_class
      @raw_class ||= begin
        pb = Flowctl::Protobuf
        fields = { "id" => 1, "metadata" => 4, "timestamp" => 5, "stellar_cursor" => 8 }.map do |name, number|
          pb::FieldDescriptorProto.new(name: name, number: number, type: :TYPE_BYTES, label: :LABEL_OPTIONAL)
        end
        file = pb::FileDescriptorProto.new(name: "fwdspec/raw.proto", package: "fwdspec.v1", syntax: "proto3",
                                           message_type: [pb::DescriptorProto.new(name: "Raw", field: fields)])
        Flowctl.load_descriptor_set(pb::FileDescriptorSet.new(file: [file]).to_proto, root: Module.new)
        Flowctl::Native.message_class("fwdspec.v1.Raw")
      end
    end

    def initialize = @seen = Queue.new

    # params: n (events), fail_at (raise UNAVAILABLE after that many), forever ("1": until cancelled)
    def stream_events(req, call)
      n = Integer(req.params["n"] || 0)
      fail_at = req.params["fail_at"]&.then { |v| Integer(v) }
      i = 0
      loop do
        break if req.params["forever"] != "1" && i >= n
        raise Flowctl::Unavailable, "source broke at #{i}" if fail_at && i == fail_at

        yield Flowctl::V1::Event.new(id: "e#{i}", type: "raw", payload: "p#{i}".b * 40, metadata: { "i" => i.to_s },
                                     timestamp: Time.at(1_700_000_000 + i, 5, :nsec))
        i += 1
        next unless req.params["forever"] == "1"

        @seen << [:source_running] if i == 3 # events are going through
        sleep 0.001
      end
    rescue Exception => e # rubocop:disable Lint/RescueException -- recorded for the spec
      @seen << [:source, e.class, call.cancelled?]
      raise
    else
      @seen << [:source, :done, i]
    end

    def process(events, _call)
      events.lazy.map { |e| Flowctl::V1::Event.new(id: e.id, type: "done", payload: e.payload, metadata: e.metadata) }
    end

    # metadata x-stop: end the call (OK) after that many events, without reading the rest
    def consume(events, call)
      stop = call.metadata["x-stop"]&.then { |v| Integer(v) }
      got = []
      events.each do |e|
        got << [e.id, e.type, e.payload.bytesize, e.metadata["i"]]
        break if stop && got.size >= stop
        raise Flowctl::InvalidArgument, "refused #{e.id}" if call.metadata["x-fail"] == e.id
      end
      @seen << [:consumer, :done, got]
      { events_consumed: got.size }
    rescue Exception => e # rubocop:disable Lint/RescueException -- recorded for the spec
      @seen << [:consumer, e.class, got]
      raise
    end
  end

  before(:all) do
    @handlers = ForwardSpecHandlers.new
    @server = Flowctl::Server.new(port: 0, tls: false, pool_size: 8)
    [v1::SourceService, v1::ProcessorService, v1::ConsumerService].each { |s| @server.handle(s, @handlers) }
    seed = Object.new
    def seed.process(requests, _call) = requests.lazy.map { |r| r }
    @server.handle(Flowctl::Processor::Service, seed)
    @port = @server.start
    # a source whose replies are not Events: fields of bytes where an Event has a string (1),
    # a map (4), a Timestamp (5) and a message (8), so that any bytes can be put there
    raw = ForwardSpecHandlers.raw_class
    bad_service = Flowctl::Service.new("flowctl.v1.SourceService",
                                       [["StreamEvents", "flowctl.v1.StreamRequest", raw.descriptor_name,
                                         :server_streaming]])
    bad = Object.new
    bad.define_singleton_method(:stream_events) do |req, _call, &out|
      3.times { |i| out.call(raw.new(id: "ok#{i}")) }
      field = (req.params["field"] || "id").to_sym
      out.call(raw.new(field => [req.params["bad"]].pack("H*")))
      3.times { |i| out.call(raw.new(id: "after#{i}")) }
    end
    @bad_server = Flowctl::Server.new(port: 0, tls: false, pool_size: 2)
    @bad_server.handle(bad_service, bad)
    @bad_port = @bad_server.start
  end

  after(:all) do
    @server&.stop(grace: 1)
    @bad_server&.stop(grace: 1)
  end

  let(:target) { "127.0.0.1:#{@port}" }
  let(:source) { v1::SourceClient.new(target, tls: false) }
  let(:processor) { v1::ProcessorClient.new(target, tls: false) }
  let(:consumer) { v1::ConsumerClient.new(target, tls: false) }

  after do
    [source, processor, consumer].each(&:close)
    @handlers.seen.clear
  end

  def seen(kind, timeout = time_limit(5))
    @pending ||= []
    Timeout.timeout(timeout, RuntimeError, "the #{kind} handler reported nothing in #{timeout} s") do
      loop do
        i = @pending.index { |s| s[0] == kind }
        return @pending.delete_at(i) if i

        @pending << @handlers.seen.pop # one blocking wait: no polling (GC.stress makes each allocation a full GC)
      end
    end
  end

  # Counts Native::Stream#forward calls (and their results) while the block runs.
  def forwards
    calls = []
    allow_any_instance_of(Flowctl::Native::Stream).to receive(:forward).and_wrap_original do |m, *args|
      calls << :called
      m.call(*args)
    end
    yield
    calls.size
  end

  # The wiring, forwarded (given the Enumerators) or not (given them as lazy Enumerables).
  def wire(params, forward:, headers: {})
    events = source.stream_events(params: params)
    events = events.lazy unless forward
    replies = processor.process(events)
    replies = replies.lazy unless forward
    consumer.consume(replies, headers: headers)
  end

  # Event counts: GC.stress (GC_STRESS=1) makes every allocation a full GC; fewer events
  # still go through every part of the loop (more than the 64 the pumps queue).
  def many(n) = ENV["GC_STRESS"] == "1" || ENV["FLOWCTL_MEMCHECK"] ? [n / 20, 70].max : n

  # Forwarded and not: the Ruby path is the reference. Under GC.stress and valgrind (which
  # check memory, not behaviour, and make each event cost seconds) only the forwarded one.
  def modes = ENV["GC_STRESS"] == "1" || ENV["FLOWCTL_MEMCHECK"] ? [true] : [true, false]

  def expected(n) = Array.new(n) { |i| ["e#{i}", "done", 40 * (1 + i.to_s.size), i.to_s] }

  def pop_within(queue, seconds) = Timeout.timeout(seconds) { queue.pop }

  it "delivers the same events in the same order as the Ruby path, with both hops forwarded" do
    n = many(300)
    results = modes.map do |fwd|
      used = forwards { expect(wire({ "n" => n.to_s }, forward: fwd).events_consumed).to eq(n) }
      expect(used).to eq(fwd ? 2 : 0)
      expect(seen(:source)).to eq([:source, :done, n])
      seen(:consumer)
    end
    expect(results[0]).to eq([:consumer, :done, expected(n)])
    expect(results[1]).to eq(results[0]) if results.size > 1
  end

  it "a slow destination slows the source: nothing is lost (flow control, no unbounded buffer)" do
    slow = ForwardSpecHandlers.new
    def slow.consume(events, call)
      got = []
      events.each do |e|
        sleep 0.02 if got.size < 5
        got << [e.id, e.type, e.payload.bytesize, e.metadata["i"]]
      end
      @seen << [:consumer, :done, got]
      { events_consumed: got.size }
    end
    server = Flowctl::Server.new(port: 0, tls: false, pool_size: 2)
    server.handle(v1::ConsumerService, slow)
    port = server.start
    sink = v1::ConsumerClient.new("127.0.0.1:#{port}", tls: false)
    n = many(2000)
    expect(sink.consume(processor.process(source.stream_events(params: { "n" => n.to_s }))).events_consumed).to eq(n)
    expect(pop_within(slow.seen, time_limit(5))).to eq([:consumer, :done, expected(n)])
    seen(:source)
  ensure
    sink&.close
    server&.stop(grace: 1)
  end

  it "a source error mid-stream: the caller gets that error, the destination call is cancelled" do
    modes.each do |fwd|
      expect { wire({ "n" => "500", "fail_at" => "120" }, forward: fwd) }
        .to raise_error(Flowctl::Unavailable, /source broke at 120/)
      expect(seen(:source)[1]).to eq(Flowctl::Unavailable)
      outcome = seen(:consumer)
      expect(outcome[1]).to eq(Flowctl::Cancelled)
      expect(outcome[2].size).to be <= 120
    end
  end

  it "a destination that ends early: the source is cancelled, the destination's response returned" do
    modes.each do |fwd|
      reply = wire({ "forever" => "1" }, forward: fwd, headers: { "x-stop" => "7" })
      expect(reply.events_consumed).to eq(7)
      expect(seen(:consumer)).to eq([:consumer, :done, expected(7)])
      outcome = seen(:source)
      expect(outcome[1]).to eq(Flowctl::Cancelled)
      expect(outcome[2]).to be(true)
    end
  end

  it "a destination that fails: its error is raised, the source is cancelled" do
    modes.each do |fwd|
      expect { wire({ "forever" => "1" }, forward: fwd, headers: { "x-fail" => "e4" }) }
        .to raise_error(Flowctl::InvalidArgument, /refused e4/)
      expect(seen(:consumer)[1]).to eq(Flowctl::InvalidArgument)
      expect(seen(:source)[1]).to eq(Flowctl::Cancelled)
    end
  end

  it "bytes that would not decode as the request class: the same DecodeError, both calls cancelled" do
    bad_source = v1::SourceClient.new("127.0.0.1:#{@bad_port}", tls: false)
    errors = modes.map do |fwd|
      events = bad_source.stream_events(params: { "bad" => "fffe" })
      events = events.lazy unless fwd
      begin
        consumer.consume(events)
      rescue Flowctl::DecodeError => e
        e
      end
    end
    expect(errors[0]).to be_a(Flowctl::DecodeError)
    expect(errors[0].message).to eq("cannot decode Flowctl::V1::Event: invalid UTF-8 in string field 'id'")
    expect(errors[1].message).to eq(errors[0].message) if errors.size > 1
    errors.size.times do
      outcome = seen(:consumer)
      expect(outcome[1]).to eq(Flowctl::Cancelled)
      ids = outcome[2].map(&:first) # the Events before the bad one may have gone through
      expect(ids).to eq(%w[ok0 ok1 ok2].first(ids.size))
    end
  ensure
    bad_source&.close
  end

  it "refuses what the decoder refuses, in the decoder's words (nested messages, maps, Timestamps, groups)" do
    bad_source = v1::SourceClient.new("127.0.0.1:#{@bad_port}", tls: false)
    raw = ForwardSpecHandlers.raw_class
    cases = { stellar_cursor: %w[08 0a05ab 00 0b 0c 0d 1a03616263 7a01 0880808080808080808002 f8ffffffff7f],
              timestamp: %w[10ffffffff0f 0880808080808080808001 088080808080808080800108],
              metadata: %w[0a02c328 1202c328 0a0161 0a01611201] }
    cases.each do |field, list|
      list = list.first(2) if ENV["GC_STRESS"] == "1" || ENV["FLOWCTL_MEMCHECK"] # seconds a call there
      list.each do |hex|
        want = begin
          v1::Event.decode(raw.new(field => [hex].pack("H*")).to_proto)
          nil
        rescue Flowctl::DecodeError => e
          e.message
        end
        got = begin
          consumer.consume(bad_source.stream_events(params: { "field" => field.to_s, "bad" => hex }))
          nil
        rescue Flowctl::DecodeError => e
          e.message
        end
        expect([field, hex, got]).to eq([field, hex, want])
        outcome = seen(:consumer)
        expect(outcome[1]).to eq(want ? Flowctl::Cancelled : :done)
      end
    end
  ensure
    bad_source&.close
  end

  it "what the decoder accepts goes through (valid UTF-8 of a string field)" do
    bad_source = v1::SourceClient.new("127.0.0.1:#{@bad_port}", tls: false)
    # field 1 (id) "é"; the rest of DataMessage is empty
    expect(consumer.consume(bad_source.stream_events(params: { "bad" => "c3a9" })).events_consumed).to eq(7)
    ids = seen(:consumer)[2].map(&:first)
    expect(ids).to eq(%w[ok0 ok1 ok2 é after0 after1 after2])
  ensure
    bad_source&.close
  end

  it "other Enumerables, or replies of another class, take the Ruby path unchanged" do
    used = forwards do
      arr = Array.new(3) { |i| v1::Event.new(id: "a#{i}", type: "t", payload: "x".b, metadata: { "i" => i.to_s }) }
      expect(consumer.consume(arr).events_consumed).to eq(3)
      expect(consumer.consume(source.stream_events(params: { "n" => "4" }).with_index.map { |e, _| e }).events_consumed)
        .to eq(4)
      expect(consumer.consume(source.stream_events(params: { "n" => "2" }).lazy.map { |e| e }).events_consumed).to eq(2)
    end
    expect(used).to eq(0)
    # a bidi of another request class: the same TypeError as before
    seed = Flowctl::Processor::Client.new(target, tls: false)
    expect { seed.process(source.stream_events(params: { "n" => "2" })).to_a }
      .to raise_error(TypeError, /writes Flowctl::Processor::DataMessage \(given Flowctl::V1::Event\)/)
    seed.close
    3.times { seen(:consumer) }
    3.times { seen(:source) }
  end

  it "the reply Enumerators stay Enumerators: next, peek, size, lazy, with_index, and forwarded afterwards" do
    events = source.stream_events(params: { "n" => "5" })
    expect(events).to be_an_instance_of(Enumerator)
    expect(events.size).to be_nil
    expect(events.peek.id).to eq("e0")
    expect(events.next.id).to eq("e0")
    expect(events.next.id).to eq("e1")
    expect(events.with_index.map { |e, i| "#{e.id}/#{i}" }).to eq(%w[e0/0 e1/1 e2/2 e3/3 e4/4])
    expect(events.lazy.map(&:id).first(2)).to eq(%w[e0 e1])
    # handed on while an external enumeration is paused: a new call, as #each makes one
    expect(consumer.consume(events).events_consumed).to eq(5)
    expect(events.next.id).to eq("e2")
    events.rewind
    expect(seen(:consumer)[2].map(&:first)).to eq(%w[e0 e1 e2 e3 e4])
  end

  it "a client with interceptors takes the Ruby path (they may look at or swap messages)" do
    seen_by = []
    interceptor = Class.new(Flowctl::ClientInterceptor) do
      define_method(:server_streamer) do |request:, call:, method:, metadata:, &blk|
        seen_by << method
        blk.call
      end
    end.new
    intercepted = v1::SourceClient.new(target, tls: false, interceptors: [interceptor])
    used = forwards { expect(consumer.consume(intercepted.stream_events(params: { "n" => "3" })).events_consumed).to eq(3) }
    expect(used).to eq(0)
    expect(seen_by).to eq(["/flowctl.v1.SourceService/StreamEvents"])
    expect(seen(:consumer)[2].size).to eq(3)
  ensure
    intercepted&.close
  end

  it "an interrupt of the wiring thread cancels both calls and does not hang" do
    [[:raise, RuntimeError], [:kill, nil]].each do |how, klass|
      started = Queue.new
      err = nil
      wiring = Thread.new do
        Thread.current.report_on_exception = false
        started << true
        wire({ "forever" => "1" }, forward: true)
      rescue Exception => e # rubocop:disable Lint/RescueException -- what the thread got
        err = e
      end
      started.pop
      seen(:source_running) # forwarding by now
      how == :raise ? wiring.raise(RuntimeError, "stop wiring") : wiring.kill
      expect(wiring.join(time_limit(5))).not_to be_nil
      expect(err).to be_a(klass) if klass
      expect(seen(:source)[1]).to eq(Flowctl::Cancelled)
      expect(seen(:consumer)[1]).to eq(Flowctl::Cancelled)
    end
  end

  it "a deadline on the source ends the forward with DeadlineExceeded and cancels the destination" do
    events = source.stream_events(params: { "forever" => "1" }, timeout: 0.3)
    expect { consumer.consume(events) }.to raise_error(Flowctl::DeadlineExceeded)
    expect(seen(:consumer)[1]).to eq(Flowctl::Cancelled)
    seen(:source)
  end
end
