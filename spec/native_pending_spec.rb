# frozen_string_literal: true

require "spec_helper"

# Flowctl::Native::Pending: a reader's events written and not acknowledged (the pipeline
# runner's replay lists, ext/flowctl/pending.c), with its limits and the gate its relays
# write through. The relays themselves run in pipeline_relay_spec.rb.
RSpec.describe Flowctl::Native::Pending do
  let(:event) { Flowctl::V1::Event }

  def ev(id, size: 0) = event.new(id: id, type: "t", payload: "x" * size)
  def ids(list) = list.events.map(&:id)

  it "keeps events oldest first; an id acknowledges it and every older one; an unknown id nothing" do
    list = described_class.new(event, 100)
    %w[a b c d].each { |i| list.push(ev(i)) }
    expect(list.size).to eq(4)
    expect(list.ack("a")).to eq(1)
    expect(ids(list)).to eq(%w[b c d])
    expect(list.ack("c")).to eq(2)
    expect(ids(list)).to eq(%w[d])
    expect(list.ack("zz")).to eq(0)
    expect(ids(list)).to eq(%w[d])
  end

  it "acknowledges an id anywhere in the list, the oldest of repeated ids first, whatever the list holds" do
    list = described_class.new(event, 100_000)
    5000.times { |i| list.push(ev("e#{i}")) }
    expect(list.ack("renamed")).to eq(0)
    expect(list.ack("e4000")).to eq(4001)
    expect(list.ack("e4000")).to eq(0)
    %w[x y x z x].each { |i| list.push(ev(i)) }
    expect(list.ack("x")).to eq(999 + 1)
    expect(ids(list)).to eq(%w[y x z x])
    expect(list.ack("x")).to eq(2)
    expect(list.ack("x")).to eq(2)
    expect(list.size).to eq(0)
  end

  # The list against an Array doing the same (the index, pending.c, is rebuilt and its slots
  # reused as events come and go): pushes of ids from a small set (so they repeat), acks of
  # ids in and out of the list, the count limit, take and clear.
  it "agrees with a plain Array over a long random run of pushes, acknowledgements, limits, takes and clears" do
    rng = Random.new(RSpec.configuration.seed)
    limit = 40
    list = described_class.new(event, limit)
    model = []
    unprotected = 0
    steps = ENV["GC_STRESS"] == "1" ? 300 : 30_000
    steps.times do |step|
      case rng.rand(100)
      when 0...55
        id = "i#{rng.rand(60)}"
        list.push(ev(id))
        model << id
        (model.shift; unprotected += 1) if model.size > limit
      when 55...95
        id = rng.rand(4).zero? ? "none#{rng.rand(5)}" : (model.sample(random: rng) || "i0")
        at = model.index(id)
        expect(list.ack(id)).to eq(at ? at + 1 : 0), "step #{step}: ack #{id} of #{model}"
        model.shift(at + 1) if at
      when 95...98
        expect(list.take.map(&:id)).to eq(model)
        model.clear
      else
        list.clear
        model.clear
      end
      expect(list.size).to eq(model.size)
    end
    expect(ids(list)).to eq(model)
    expect(list.unprotected).to eq(unprotected)
  end

  it "takes messages or their bytes, and gives events back as messages (take empties the list)" do
    list = described_class.new(event, 10)
    list.push(ev("m"))
    list.push(ev("b").to_proto)
    got = list.take
    expect(got.map(&:class).uniq).to eq([event])
    expect(got.map(&:id)).to eq(%w[m b])
    expect(list.size).to eq(0)
    expect { list.push(Flowctl::V1::StreamRequest.new) }.to raise_error(TypeError, /Flowctl::V1::Event/)
    expect { list.push(42) }.to raise_error(TypeError)
  end

  it "lets the oldest go past its count or byte limit, counting them, and always keeps the newest" do
    by_count = described_class.new(event, 3)
    %w[a b c d e].each { |i| by_count.push(ev(i)) }
    expect([ids(by_count), by_count.unprotected]).to eq([%w[c d e], 2])

    by_bytes = described_class.new(event, 100, 3000)
    5.times { |i| by_bytes.push(ev("e#{i}", size: 1000)) }
    expect(ids(by_bytes)).to eq(%w[e3 e4])
    expect(by_bytes.bytes).to be <= 3000
    expect(by_bytes.unprotected).to eq(3)
    by_bytes.push(ev("huge", size: 10_000))
    expect(ids(by_bytes)).to eq(%w[huge])
    by_bytes.push(ev("next"))
    expect(ids(by_bytes)).to eq(%w[next])
    expect(by_bytes.bytes).to be < 3000
    by_bytes.clear
    expect([by_bytes.size, by_bytes.bytes]).to eq([0, 0])
  end

  it "opens its gate with a new epoch each time (relays write at the epoch they were given)" do
    list = described_class.new(event, 10)
    first = list.open
    list.shut
    second = list.open
    expect(second).to be > first
  end

  it "refuses bad arguments with a clear error" do
    expect { described_class.new(event, 0) }.to raise_error(ArgumentError, /limit must be positive/)
    expect { described_class.new(event, 1, 0) }.to raise_error(ArgumentError, /byte_limit/)
    expect { described_class.new(String, 1) }.to raise_error(TypeError, /not a generated message class/)
    expect { described_class.new(Flowctl::V1::StreamRequest, 1) }.to raise_error(ArgumentError, /no string field id/)
    expect { Flowctl::Native::Relay.new(Flowctl::V1::StreamRequest, [], "k") }.to raise_error(ArgumentError, /field/)
    expect { Flowctl::Native::Relay.new(event, [1], "k") }.to raise_error(TypeError)
    expect { Flowctl::Native::Relay.new(event, [], "") }.to raise_error(ArgumentError, /failure key/)
  end

  it "stays flat over many pushes and acknowledgements, and survives GC.compact" do
    list = described_class.new(event, 50)
    n = ENV["GC_STRESS"] == "1" ? 200 : 20_000
    n.times do |i|
      list.push(ev(i.to_s))
      list.ack((i - 10).to_s) if i >= 10
      GC.compact if (i % 5000).zero? && GC.respond_to?(:compact)
    end
    expect(list.size).to eq(10)
    expect(list.unprotected).to eq(0)
    expect(ids(list)).to eq(((n - 10)...n).map(&:to_s))
  end
end
