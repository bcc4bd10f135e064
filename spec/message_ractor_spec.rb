# frozen_string_literal: true

require "spec_helper"

# Messages in Ractors other than the main one: built, encoded, decoded, compared and frozen-shared
# (message.c defines the message methods Ractor-safe; frozen messages are shareable).
RSpec.describe "Flowctl messages in Ractors" do
  around do |ex|
    experimental = Warning[:experimental]
    Warning[:experimental] = false
    ex.run
  ensure
    Warning[:experimental] = experimental
  end

  it "builds, encodes and decodes messages in a non-main Ractor, bytes equal to the main Ractor's" do
    r = Ractor.new do
      ev = Flowctl::V1::Event.new(id: "e1", type: "t", payload: "\x00\xFF".b, metadata: { "k" => "v" },
                                  timestamp: Time.at(1_700_000_000, 5, :nsec))
      info = Flowctl::V1::ComponentInfo.new(id: "c", type: :COMPONENT_TYPE_PROCESSOR, input_event_types: %w[a b])
      back = Flowctl::V1::Event.decode(ev.to_proto)
      [ev.to_proto, info.to_proto, back == ev, back.timestamp.nsec, back.to_h[:metadata], info.type, back.inspect]
    end
    bytes, info_bytes, equal, nsec, metadata, type, inspect = r.take
    expect(bytes).to eq(Flowctl::V1::Event.new(id: "e1", type: "t", payload: "\x00\xFF".b, metadata: { "k" => "v" },
                                               timestamp: Time.at(1_700_000_000, 5, :nsec)).to_proto)
    expect(Flowctl::V1::ComponentInfo.decode(info_bytes).input_event_types).to eq(%w[a b])
    expect([equal, nsec, metadata, type]).to eq([true, 5, { "k" => "v" }, :COMPONENT_TYPE_PROCESSOR])
    expect(inspect).to start_with("#<Flowctl::V1::Event id: \"e1\"")
  end

  it "raises the usual errors inside a Ractor" do
    r = Ractor.new do
      errors = []
      begin
        Flowctl::ControlPlane::RegisterProcessorRequest.decode("\xFF\xFF\xFF")
      rescue Flowctl::DecodeError => e
        errors << e.class
      end
      begin
        Flowctl::ControlPlane::RegisterProcessorRequest.new(processor_id: 5)
      rescue TypeError => e
        errors << e.class
      end
      errors << Flowctl::RPCError.for_code(14) << Flowctl::NotFound.new("x").code << Flowctl::RPCError.new("y", code: 3).code
      errors
    end
    expect(r.take).to eq([Flowctl::DecodeError, TypeError, Flowctl::Unavailable, 5, 3])
  end

  it "shares frozen messages between Ractors (Ractor.make_shareable), nested maps, lists and messages included" do
    msg = Flowctl::V1::ComponentInfo.new(id: "c1", metadata: { "zone" => "eu" }, input_event_types: %w[x])
    shared = Ractor.make_shareable(msg)
    expect(Ractor.shareable?(shared)).to be(true)
    expect([shared.frozen?, shared.metadata.frozen?, shared.input_event_types.frozen?]).to eq([true, true, true])
    r = Ractor.new(shared) { |m| [m.id, m.metadata, m.input_event_types, m.to_proto, m.equal?(m)] }
    id, metadata, types, bytes, = r.take
    expect([id, metadata, types]).to eq(["c1", { "zone" => "eu" }, %w[x]])
    expect(bytes).to eq(msg.to_proto)
  end

  it "sends back a message made shareable inside the other Ractor" do
    r = Ractor.new do
      hb = Flowctl::ControlPlane::ProcessorHeartbeatRequest.new(processor_id: "p", timestamp: Time.at(7),
                                                                metrics: { "lag" => 1.5 }, status: "HEALTHY")
      Ractor.make_shareable(hb)
    end
    hb = r.take
    expect(Ractor.shareable?(hb)).to be(true)
    expect([hb.processor_id, hb.metrics, hb.timestamp]).to eq(["p", { "lag" => 1.5 }, Time.at(7)])
  end
end
