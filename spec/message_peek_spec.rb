# frozen_string_literal: true

require_relative "spec_helper"
require "objspace"

# Message#peek reads one field of a message decoded lazily without building the others, and a
# message nothing has built since it was decoded goes out on a stream as the bytes it came in
# (what the pipeline Router does with every event: it reads the type, the id and the metadata,
# and passes the event on).
RSpec.describe "Flowctl::Message#peek and untouched messages on the wire" do
  let(:event) { Flowctl::V1::Event }
  # field 1000, length-delimited, 600 bytes: unknown to Event; an eager decode drops it
  let(:pad) { "\xc2\x3e\xd8\x04".b + ("p" * 600) }

  def sample
    event.new(id: "evt-1", type: "bench.v1", payload: "\x00\xff".b * 300, metadata: { "k" => "v", "é" => "中" },
              timestamp: Time.at(1_700_000_000, 123_456_789, :nsec), content_type: "application/octet-stream",
              stellar_cursor: Flowctl::V1::StellarCursor.new(ledger_sequence: 2**40, index_in_ledger: 3))
  end

  # True while the message still holds its wire bytes (nothing of it built yet).
  def unbuilt?(msg, bytes) = ObjectSpace.reachable_objects_from(msg).any? { |o| o.is_a?(String) && o == bytes }


  # a string field of a number below 16 and a value shorter than 128 bytes: one byte each for key and length
  def string_field(number, value) = [(number << 3) | 2, value.bytesize].pack("C2") + value.b

  it "gives each field's value as the accessor does, and builds nothing" do
    bytes = pad + sample.to_proto
    eager = sample
    event.fields.each do |name|
      lazy = event.decode(bytes)
      expect(lazy.peek(name)).to eq(eager[name]), name.to_s
      expect(lazy.peek(name.to_s)).to eq(eager[name]), name.to_s
      expect(unbuilt?(lazy, bytes)).to be(true), "#{name}: built"
    end
  end

  it "gives defaults for absent fields: frozen empty maps and lists, nil messages" do
    bytes = pad + event.new(payload: "x" * 10).to_proto
    lazy = event.decode(bytes)
    expect(lazy.peek(:id)).to eq("")
    expect(lazy.peek(:metadata)).to eq({}).and be_frozen
    expect(lazy.peek(:timestamp)).to be_nil
    expect(lazy.peek(:stellar_cursor)).to be_nil
    expect(Flowctl::V1::ComponentInfo.decode(pad + Flowctl::V1::ComponentInfo.new(id: "c").to_proto)
                                     .peek(:input_event_types)).to eq([]).and be_frozen
    expect(unbuilt?(lazy, bytes)).to be(true)
  end

  it "decodes a field written several times as the decoder does: the last string wins, maps and lists gather" do
    bytes = pad + string_field(2, "first") + string_field(1, "id") + string_field(2, "last") +
            event.new(metadata: { "a" => "1" }).to_proto + event.new(metadata: { "b" => "2", "a" => "3" }).to_proto
    expect(event.decode(bytes).peek(:type)).to eq("last")
    expect(event.decode(bytes).peek(:metadata)).to eq(event.decode(bytes).metadata)
    expect(event.decode(bytes).peek(:metadata)).to eq({ "a" => "3", "b" => "2" })
    info = Flowctl::V1::ComponentInfo
    many = pad + info.new(input_event_types: %w[a b]).to_proto + info.new(id: "x", input_event_types: %w[c]).to_proto
    expect(info.decode(many).peek(:input_event_types)).to eq(%w[a b c])
  end

  it "gives values of their own: changing one does not change the message" do
    lazy = event.decode(pad + sample.to_proto)
    meta = lazy.peek(:metadata)
    meta["k"] = "changed"
    expect(lazy.metadata["k"]).to eq("v")
    expect(lazy.peek(:id)).to be_frozen
  end

  it "is the accessor on a message already built, and raises for unknown fields" do
    built = sample
    expect(built.peek(:metadata)).to equal(built.metadata)
    expect(built.peek(:id)).to equal(built.id)
    expect { built.peek(:nope) }.to raise_error(ArgumentError, /unknown field :nope/)
    expect { event.decode(pad + sample.to_proto).peek(:nope) }.to raise_error(ArgumentError, /unknown field :nope/)
    expect { built.peek(1) }.to raise_error(TypeError, /field names are Symbols or Strings/)
  end

  describe "on a stream" do
    before(:all) do
      @seen = Queue.new
      seen = @seen
      handler = Class.new do
        define_method(:consume) do |events, _call|
          n = 0
          events.each do |e| # kept as they came: not built
            seen << e
            n += 1
          end
          Flowctl::V1::ConsumeResponse.new(events_consumed: n)
        end
      end.new
      @server = Flowctl::Server.new(port: 0, tls: false)
      @server.handle(Flowctl::V1::ConsumerService, handler)
      @target = "127.0.0.1:#{@server.start}"
    end

    after(:all) { @server&.stop(grace: 1) }

    let(:consumer) { Flowctl::V1::ConsumerClient.new(@target, tls: false) }

    after { consumer.close }

    it "sends an untouched or only peeked message as the bytes it came in, a changed one encoded anew" do
      bytes = pad + sample.to_proto
      untouched = event.decode(bytes)
      peeked = event.decode(bytes)
      expect(peeked.peek(:type)).to eq("bench.v1")
      changed = event.decode(bytes)
      changed.type = "other"
      expect(consumer.consume([untouched, peeked, changed]).events_consumed).to eq(3)
      got = Array.new(3) { @seen.pop }
      expect(unbuilt?(got[0], bytes)).to be(true) # the unknown field went along: these very bytes
      expect(unbuilt?(got[1], bytes)).to be(true)
      expect(got[2].type).to eq("other")
      expect(got[2].to_proto).to eq(sample.tap { |s| s.type = "other" }.to_proto) # encoded: the unknown field dropped
      expect(got.first(2)).to all(eq(sample))
    end
  end
end
