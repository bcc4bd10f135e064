# frozen_string_literal: true

require_relative "spec_helper"
require "objspace"

# A bytes field that is most of a message decoded lazily (512 bytes or more) shares the message's
# frozen copy of its bytes when the message is built (convert.c, bytes_value): a processor that
# reads a 1 KiB payload does not copy it a second time. A short bytes value is a copy, so that it
# never keeps a large message's bytes alive.
RSpec.describe "Flowctl messages: large bytes values share the decoded bytes" do
  let(:event) { Flowctl::V1::Event }
  let(:payload) { (0..255).map(&:chr).join.b * 4 } # 1 KiB, every byte value

  def own_bytes(str) = ObjectSpace.memsize_of(str) >= str.bytesize

  it "builds a large payload without a copy of its own, equal, frozen and binary" do
    decoded = event.decode(event.new(id: "e1", type: "raw", payload: payload).to_proto)
    got = decoded.payload
    expect(got).to eq(payload)
    expect(got).to be_frozen
    expect(got.encoding).to eq(Encoding::BINARY)
    expect(own_bytes(got)).to be(false)
    expect(decoded.id).to eq("e1")
    expect(decoded.to_proto).to eq(event.new(id: "e1", type: "raw", payload: payload).to_proto)
  end

  it "copies a bytes value that is the smaller part of a large message" do
    msg = event.new(id: "e2", type: "t" * 700, payload: "p".b * 300)
    decoded = event.decode(msg.to_proto)
    expect(decoded.payload).to eq("p".b * 300)
    expect(own_bytes(decoded.payload)).to be(true)
  end

  it "keeps a shared payload whole after the message and its bytes are gone (GC, compaction)" do
    wire = event.new(id: "e3", type: "raw", payload: payload).to_proto
    kept = Array.new(50) { event.decode(wire.dup).payload }
    GC.start
    GC.compact if GC.respond_to?(:compact)
    expect(kept).to all(eq(payload))
    dup = kept.first.dup
    dup << "x"
    expect(kept.first).to eq(payload)
  end
end
