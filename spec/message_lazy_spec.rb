# frozen_string_literal: true

require_relative "spec_helper"
require "objspace"

# A message of 512 bytes or more (FLOWCTL_LAZY_MIN in ext/flowctl/flowctl.h) is checked
# when decoded and its fields built when first touched (message.c, convert.c's check mode). Every
# outcome must be what decoding it at once gives: the same values through every reader, the same
# Flowctl::DecodeError at decode time. An unknown field of 600 bytes put in front of an input makes it
# large without changing what it decodes to, so each input below is decoded both ways.
RSpec.describe "Flowctl messages decoded lazily" do
  include MessageHelpers

  let(:pad) { "\xc2\x3e\xd8\x04".b + ("p" * 600) } # field 1000, length-delimited, 600 bytes: unknown to every class
  let(:event) { Flowctl::V1::Event }
  let(:status) { Flowctl::V1::ComponentStatusResponse }
  let(:list) { Flowctl::V1::DiscoveryResponse }
  let(:hb) { Flowctl::ControlPlane::ProcessorHeartbeatRequest }
  let(:reg) { Flowctl::ControlPlane::RegisterProcessorRequest }
  let(:caps) { Flowctl::Processor::CapabilitiesResponse }
  let(:classes) { MessageHelpers::STRESS ? [event, hb] : [event, status, list, hb, reg, caps] } # GC_STRESS=1: two classes

  # What decoding gives, in a form to compare: the values and the encoding, or the error
  # decode raised (an error left for later would raise out of to_h and fail the example).
  def outcome(klass, bytes)
    msg = begin
      klass.decode(bytes)
    rescue Flowctl::DecodeError => e
      return [:error, e.message]
    end
    [:ok, msg.to_h, msg.to_proto]
  end

  # True while the message still holds its wire bytes (nothing of it built yet).
  def unbuilt?(msg, bytes)
    ObjectSpace.reachable_objects_from(msg).any? { |o| o.is_a?(String) && o == bytes }
  end

  def field(number, wire_type, body)
    key = varint((number << 3) | wire_type)
    wire_type == 2 ? key + varint(body.bytesize) + body.b : key + body.b
  end

  def varint(n)
    out = +"".b
    loop do
      byte = n & 0x7f
      n >>= 7
      out << (n.zero? ? byte : byte | 0x80).chr
      return out if n.zero?
    end
  end

  def sample_event(i = 1)
    event.new(id: "evt-#{i}", type: "bench.v1", payload: "\x00\xff".b * 300, metadata: { "k" => "v#{i}", "é" => "中" },
              timestamp: Time.at(1_700_000_000, 123_456_789, :nsec), content_type: "application/octet-stream",
              stellar_cursor: Flowctl::V1::StellarCursor.new(ledger_sequence: 2**40 + i, index_in_ledger: 3))
  end

  it "builds a large message when it is first touched, and only then" do
    bytes = sample_event.to_proto
    msg = event.decode(bytes)
    expect(unbuilt?(msg, bytes)).to be(true)
    expect(msg.id).to eq("evt-1")
    expect(unbuilt?(msg, bytes)).to be(false)
    expect(msg.payload).to eq("\x00\xff".b * 300)
    expect(msg).to eq(sample_event)

    small = event.new(id: "x", payload: "y" * 400).to_proto
    expect(unbuilt?(event.decode(small), small)).to be(false)
  end

  it "gives every reader the values an eager decode gives (accessors, [], to_h, ==, hash, inspect, JSON, dup, to_proto)" do
    bytes = sample_event.to_proto
    readers = {
      id: ->(m) { m.id }, index: ->(m) { m[:timestamp] }, to_h: ->(m) { m.to_h }, eq: ->(m) { m == sample_event },
      hash: ->(m) { m.hash == sample_event.hash }, inspect: ->(m) { m.inspect }, to_proto: ->(m) { m.to_proto },
      json: ->(m) { m.to_json }, dup: ->(m) { m.dup.to_h }, metadata: ->(m) { m.metadata.to_a },
      cursor: ->(m) { m.stellar_cursor.ledger_sequence }, freeze: ->(m) { m.freeze.frozen? && m.payload.frozen? }
    }
    readers.each do |name, read|
      lazy = event.decode(bytes)
      expect(unbuilt?(lazy, bytes)).to be(true), name.to_s
      expect(read.call(lazy)).to eq(read.call(sample_event.dup)), "reader #{name}"
    end
  end

  it "keeps its values when a setter is the first thing to touch it" do
    msg = event.decode(sample_event.to_proto)
    msg.id = "changed"
    expect(msg.to_h).to eq(sample_event.to_h.merge(id: "changed"))
  end

  it "is built from its own copy: the String it was decoded from may change afterwards" do
    str = sample_event.to_proto.dup # not frozen
    msg = event.decode(str)
    str.replace("\x0a\x01z".b * 200)
    str.setbyte(0, 0)
    expect(msg).to eq(sample_event)

    big = ("\x00".b * 100_000) + sample_event.to_proto # a frozen slice shares this buffer: not kept by the message
    slice = big.byteslice(100_000..).freeze
    msg = event.decode(slice)
    held = ObjectSpace.reachable_objects_from(msg).select { |o| o.is_a?(String) && o == slice }
    expect(held.size).to eq(1)
    expect(held.first).not_to equal(slice)
    expect(msg).to eq(sample_event)
  end

  it "is read right when nested into another message, or put into a list, before it is built" do
    lazy_info = Flowctl::V1::ComponentInfo.decode(Flowctl::V1::ComponentInfo.new(id: "c1", description: "d" * 600,
                                                                                 input_event_types: %w[a b]).to_proto)
    outer = status.new(component: lazy_info, status: :HEALTH_STATUS_HEALTHY)
    expect(JSON.parse(outer.to_json)["component"]).to include("id" => "c1", "inputEventTypes" => %w[a b])

    lazy_info = Flowctl::V1::ComponentInfo.decode(Flowctl::V1::ComponentInfo.new(id: "c2", description: "d" * 600).to_proto)
    many = list.new
    many.components << lazy_info
    expect(list.decode(many.to_proto).components.map(&:id)).to eq(["c2"])
    lazy_info = Flowctl::V1::ComponentInfo.decode(Flowctl::V1::ComponentInfo.new(id: "c3", description: "d" * 600).to_proto)
    many.components << lazy_info
    expect(JSON.parse(many.to_json)["components"].map { |c| c["id"] }).to eq(%w[c2 c3])
  end

  it "is built before it is frozen, so a shareable one is read from any Ractor" do
    prev = Warning[:experimental]
    Warning[:experimental] = false
    bytes = sample_event.to_proto
    msg = Ractor.make_shareable(event.decode(bytes))
    expect(unbuilt?(msg, bytes)).to be(false)
    r = Ractor.new(msg) { |m| [m.id, m.payload.bytesize, m.timestamp.nsec, m.metadata["é"]] }
    expect(r.take).to eq(["evt-1", 600, 123_456_789, "中"])
  ensure
    Warning[:experimental] = prev
  end

  it "survives GC.stress and compaction while it waits to be built" do
    bytes = Array.new(20) { |i| sample_event(i).to_proto }
    msgs = nil
    was = GC.stress
    begin
      GC.stress = true
      msgs = bytes.first(3).map { |b| event.decode(b) }
    ensure
      GC.stress = was
    end
    msgs += bytes.drop(3).map { |b| event.decode(b) }
    GC.verify_compaction_references(double_heap: true, toward: :empty)
    expect(msgs.map(&:id)).to eq(Array.new(20) { |i| "evt-#{i}" })
    expect(msgs.each_with_index.all? { |m, i| m == sample_event(i) }).to be(true)
  end

  describe "received over gRPC (client streaming to the server, server streaming to the client)" do
    before(:all) do
      @ended = ended = Queue.new
      @seen = seen = []
      @sent = sent = [Flowctl::V1::Event.new(id: "a", payload: "x" * 1000), Flowctl::V1::Event.new(id: "b", payload: "y" * 300_000),
                      Flowctl::V1::Event.new(id: "c", type: "small")]
      handler = Class.new do
        define_method(:consume) do |events, _call|
          events.each { |e| seen << e } # kept as they come: not built
          Flowctl::V1::ConsumeResponse.new(events_consumed: seen.size)
        ensure
          ended << true
        end
        define_method(:stream_events) do |_req, _call, &blk|
          sent.each(&blk)
          nil
        end
      end.new
      @server = Flowctl::Server.new(port: 0, tls: false)
      @server.handle(Flowctl::V1::ConsumerService, handler)
      @server.handle(Flowctl::V1::SourceService, handler)
      @target = "127.0.0.1:#{@server.start}"
    end

    after(:all) { @server&.stop(grace: 1) }

    before do
      @seen.clear
      @ended.clear
    end

    it "arrive equal to what was sent, one of them in several of gRPC's slices" do
      consumer = Flowctl::V1::ConsumerClient.new(@target, tls: false)
      source = Flowctl::V1::SourceClient.new(@target, tls: false)
      expect(consumer.consume(@sent).events_consumed).to eq(3)
      expect(@seen == @sent).to be(true)
      got = []
      source.stream_events(Flowctl::V1::StreamRequest.new) { |e| got << e }
      expect(got.map { |e| [e.id, e.payload.bytesize] }).to eq([["a", 1000], ["b", 300_000], ["c", 0]])
      expect(got == @sent).to be(true)
    ensure
      consumer&.close
      source&.close
    end

    it "stay readable after their call is over: Events a handler kept unread, then the client cancelled" do
      consumer = Flowctl::V1::ConsumerClient.new(@target, tls: false)
      call = consumer.consume_stream
      call << @sent[0] << @sent[1]
      wait_for = lambda do |&done|
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + time_limit(10)
        sleep 0.01 until done.call || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
        done.call
      end
      expect(wait_for.call { @seen.size == 2 }).to be(true)
      call.cancel
      expect(wait_for.call { !@ended.empty? }).to be(true) # the handler saw the cancel; the server released the call
      GC.start
      expect(@seen.map { |e| [e.id, e.payload.bytesize, e.payload[0]] }).to eq([["a", 1000, "x"], ["b", 300_000, "y"]])
    ensure
      consumer&.close
    end

    it "raise the DecodeError of a bad one when the handler reads it (INTERNAL to the client)" do
      Official.load!
      stub = GRPC::ClientStub.new(@target, :this_channel_is_insecure)
      bad = pad + "\x0a\x02\xff\xfe".b
      same = ->(x) { x }
      expect { stub.client_streamer("/flowctl.v1.ConsumerService/Consume", [@sent[0].to_proto, bad], same, same) }
        .to raise_error(GRPC::Internal, /cannot decode.*invalid UTF-8 in string field 'id'/)
      expect(@seen.map(&:id)).to eq(["a"])
    end
  end

  describe "the same outcome as decoding at once" do
    # Inputs that decode, some of them unusual: merged messages and timestamps, packed and
    # unpacked lists, wrong wire types, 10-byte varints, unknown fields.
    let(:valid) do
      ts = ->(s, n = nil) { field(1, 0, varint(s)) + (n ? field(2, 0, varint(n)) : "".b) }
      [
        sample_event.to_proto,
        field(5, 2, ts.(5)) + field(5, 2, field(2, 0, varint(7))),                     # Timestamp given twice: merged
        field(8, 2, field(1, 0, varint(9))) + field(8, 2, field(2, 0, varint(4))),     # a message given twice: merged
        field(4, 2, field(1, 2, "k") + field(2, 2, "a") + field(2, 2, "b")),           # a map value given twice
        field(1, 2, "x") + field(1, 2, "y"),                                           # a string given twice
        field(1, 0, varint(5)),                                                        # a string field as a varint
        field(2, 0, varint(2**64 - 1)) + field(5, 0, varint(1)),                       # 10-byte varint, enum/Timestamp as varint
        field(1, 2, field(1, 2, "c") + field(5, 0, varint(2**64 - 2))),                # a nested ComponentInfo, negative enum
        field(3, 2, field(1, 2, "m") + field(2, 1, "\x00" * 8)),                       # a map<string, double> entry
        field(5, 2, "a") + field(6, 2, "") + field(7, 2, "b" * 20),                    # lists of strings, empty ones
        field(6, 2, "".b) + field(6, 0, varint(3)) + field(6, 2, varint(1) + varint(2)), # packed and unpacked
        field(3, 2, "") + field(2, 1, "\x01" * 8) + field(1, 5, "\x01" * 4),           # fixed64 / fixed32 where others are due
        field(999, 2, "z") + field(12, 0, varint(1)) + field(13, 5, "abcd")            # unknown fields
      ]
    end

    let(:invalid) do
      [
        "\x0a\x05ab", "\x38\xff\xff", "\x38#{"\xff" * 10}\x01", "\x80", "\x00\x01", "\x0c", "\x0b", "\x0e\x01",
        "\x0f\x01", "\x79\x01\x02", "\x7d\x01", "\x7a#{"\xff" * 9}\x01", "\x7a\x80\x80\x80\x80\x08",
        "\x7b\x08\x01\x74", "\x7b\x08\x01", "\x7b" * 2_000,
        "\x0a\x02\xff\xfe", "\x12\x01\xc3", "\x2a\x02ok\x2a\x01\x80", "\x0a\x03\xed\xa0\x80",  # invalid UTF-8, a surrogate
        "\x12\x06\x10\x80\x94\xeb\xdc\x03", "\x12\x0b\x10#{"\xff" * 9}\x01", "\x12\x07\x08\x80\x83\xd1\xff\xaf\x07",
        "\x2a\x06\x10\x80\x94\xeb\xdc\x03", "\x1a\x06\x10\x80\x94\xeb\xdc\x03",            # nanos 1e9 at fields 5 and 3
        field(5, 2, field(1, 0, varint(2**62))) + field(5, 2, field(1, 0, varint(5))),  # range error before a merge
        field(5, 2, field(1, 0, varint(5))) + field(5, 2, field(2, 0, varint(10**9))),  # range error only once merged
        field(8, 2, field(1, 0, varint(1))) + field(8, 2, "\x08"),                      # garbage in a merged message
        field(4, 2, field(1, 2, "\xff") + field(2, 2, "v")), field(3, 2, field(2, 1, "\x00")),
        field(6, 2, varint(1) + "\x80"), field(1, 2, field(1, 2, "ok") + field(2, 2, "\xc3"))
      ]
    end

    it "for inputs that decode" do
      valid.first(scaled(valid.size, 5)).each do |bytes|
        classes.each do |klass|
          expect(outcome(klass, pad + bytes)).to eq(outcome(klass, bytes)), "#{klass} #{bytes.inspect[0, 80]}"
        end
      end
    end

    it "for inputs that do not: the same Flowctl::DecodeError, raised by decode" do
      invalid.each_slice(scaled(1, 4)).map(&:first).each do |bytes|
        classes.each do |klass|
          expect(outcome(klass, pad + bytes.b)).to eq(outcome(klass, bytes.b)), "#{klass} #{bytes.inspect[0, 80]}"
        end
      end
      expect(outcome(event, pad + "\x0a\x02\xff\xfe".b)).to eq([:error, "cannot decode Flowctl::V1::Event: invalid UTF-8 in string field 'id'"])
    end

    it "for every prefix and every one-byte change of an Event (seeded)",
       skip: MessageHelpers::STRESS && "hundreds of decodes under GC.stress (checked in normal runs)" do
      bytes = event.new(id: "evt-1", type: "t", payload: "\x00\xff".b * 40, metadata: { "k" => "v", "é" => "中" },
                        timestamp: Time.at(1_700_000_000, 5, :nsec), content_type: "a/b",
                        stellar_cursor: Flowctl::V1::StellarCursor.new(ledger_sequence: 2**40, index_in_ledger: 3)).to_proto
      expect(bytes.bytesize).to be < 512
      rng = Random.new(12)
      inputs = (0..bytes.bytesize).step(scaled(1, 9)).map { |cut| bytes.byteslice(0, cut) } # under GC.stress: fewer
      inputs += Array.new(scaled(400)) do
        b = bytes.dup
        b.setbyte(rng.rand(b.bytesize), rng.rand(256))
        b
      end
      inputs.each do |b|
        [event, status].each { |klass| expect(outcome(klass, pad + b)).to eq(outcome(klass, b)), b.inspect[0, 80] }
      end
    end
  end
end
