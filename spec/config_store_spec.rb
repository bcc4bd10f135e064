# frozen_string_literal: true

require "spec_helper"
require "flowctl/config"
require "tmpdir"

# Live configuration: schema validation, versions, history, rollback, persistence, and the
# control plane's ConfigService over gRPC (the gem's extension flowctl.ext.v1).
RSpec.describe Flowctl::Config do
  let(:schema) do
    Flowctl::Config::Schema.new(
      "rate" => { type: :integer, required: true, min: 1, max: 1000, default: 10 },
      "network" => { type: :string, allowed: %w[testnet mainnet], default: "testnet" },
      "ratio" => { type: :number, min: 0, max: 1 },
      "verbose" => { type: :boolean }
    )
  end

  def refused(&block)
    block.call
    raise "not refused"
  rescue Flowctl::InvalidArgument => e
    e.details
  end

  it "validates keys, types, required keys, ranges and allowed values, naming the key" do
    expect(schema.validate("rate" => 5, "ratio" => 0.5, "verbose" => true)).to eq("rate" => 5, "ratio" => 0.5, "verbose" => true)
    expect(refused { schema.validate("rate" => 5000) }).to eq('config key "rate": 5000 is above the maximum 1000')
    expect(refused { schema.validate("rate" => 0) }).to eq('config key "rate": 0 is below the minimum 1')
    expect(refused { schema.validate("rate" => "5") }).to eq('config key "rate": expected an integer (given "5")')
    expect(refused { schema.validate("rate" => 5, "network" => "devnet") }).to eq('config key "network": "devnet" is not one of "testnet", "mainnet"')
    expect(refused { schema.validate("rate" => 5, "verbose" => "yes") }).to eq('config key "verbose": expected true or false (given "yes")')
    expect(refused { schema.validate("network" => "testnet") }).to eq('config key "rate" is required')
    expect(refused { schema.validate("rate" => 5, "rat" => 1) }).to eq('config key "rat" is not in the component\'s schema (keys: rate, network, ratio, verbose)')
    expect { Flowctl::Config::Schema.new("x" => { type: :date }) }.to raise_error(ArgumentError, /config schema key "x": type must be one of/)
    expect { Flowctl::Config::Schema.new("x" => { type: :integer, max: 3, default: 5 }) }.to raise_error(ArgumentError, /default: .*5 is above the maximum 3/)
    # the schema survives its proto and JSON forms
    expect(Flowctl::Config::Schema.from_proto(schema.to_proto).to_h).to eq(schema.to_h)
    expect(Flowctl::Config::Schema.from_h(JSON.parse(JSON.generate(schema.to_h))).to_h).to eq(schema.to_h)
  end

  it "keeps versions, history and rolls back; an invalid update changes nothing" do
    store = Flowctl::Config::Store.new
    v1 = store.declare("sq", schema)
    expect([v1.version, v1.values]).to eq([1, { "rate" => 10, "network" => "testnet" }])
    v2 = store.update("sq", { "rate" => 20 }, merge: true, author: "ops", comment: "faster")
    expect([v2.version, v2.values, v2.author, v2.comment]).to eq([2, { "rate" => 20, "network" => "testnet" }, "ops", "faster"])
    expect(refused { store.update("sq", { "rate" => -1 }, merge: true) }).to eq('config key "rate": -1 is below the minimum 1')
    expect(store.get("sq").version).to eq(2)
    v3 = store.update("sq", { "rate" => 30 })
    expect(v3.values).to eq("rate" => 30)
    v4 = store.rollback("sq", 1, author: "ops")
    expect([v4.version, v4.values, v4.comment]).to eq([4, v1.values, "rollback to version 1"])
    expect(store.history("sq").map(&:version)).to eq([1, 2, 3, 4])
    expect(store.get("sq", 2).values["rate"]).to eq(20)
    expect { store.rollback("sq", 9) }.to raise_error(Flowctl::NotFound, /no config version 9/)
    # a schema the current version does not fit is refused
    strict = Flowctl::Config::Schema.new("rate" => { type: :integer, max: 5 })
    expect(refused { store.declare("sq", strict) }).to eq('config key "rate": 10 is above the maximum 5')
  end

  it "wakes a watcher when a new version is made" do
    store = Flowctl::Config::Store.new
    store.update("p", { "a" => 1 })
    t = Thread.new { store.wait_for("p", 1, time_limit(5)) }
    sleep 0.1
    store.update("p", { "a" => 2 })
    expect(t.value.values).to eq("a" => 2)
    expect(store.wait_for("p", 2, 0.05)).to be_nil
  end

  it "persists schemas and versions in SQLite across a control plane restart" do
    Dir.mktmpdir do |dir|
      db = File.join(dir, "cp.db")
      store = Flowctl::Config::Store.new(db)
      store.declare("sq", schema)
      store.update("sq", { "rate" => 99 }, merge: true, author: "ops")
      store.close
      again = Flowctl::Config::Store.new(db)
      expect(again.history("sq").map { |v| [v.version, v.values, v.author] }).to eq(
        [[1, { "rate" => 10, "network" => "testnet" }, "schema defaults"], [2, { "rate" => 99, "network" => "testnet" }, "ops"]]
      )
      expect(again.schema("sq").to_h).to eq(schema.to_h)
      expect(refused { again.update("sq", { "rate" => 1001 }) }).to eq('config key "rate": 1001 is above the maximum 1000')
      again.close
    end
  end

  describe Flowctl::Config::Service do
    let(:acks) { {} }
    let(:service) { described_class.new(Flowctl::Config::Store.new, acknowledged: ->(id) { acks[id] }) }
    let(:client_class) do
      Class.new(Flowctl::Client) { use_service Flowctl::Ext::V1::ConfigService }
    end

    around do |ex|
      @server = Flowctl::Server.new(host: "127.0.0.1", port: 0, tls: false)
      @server.handle(Flowctl::Ext::V1::ConfigService, service)
      port = @server.start
      @client = client_class.new("127.0.0.1:#{port}", tls: false)
      ex.run
    ensure
      @client&.close
      service.stop
      @server.stop(grace: 1)
    end

    it "serves declare, update (INVALID_ARGUMENT naming the key), get, history, rollback over gRPC" do
      v = @client.declare_schema(component_id: "sq", schema: schema.to_proto)
      expect([v.version, v.values]).to eq([1, { "rate" => "10", "network" => "\"testnet\"" }])
      v = @client.update_config(component_id: "sq", values: { "rate" => "250" }, merge: true, author: "ops")
      expect([v.version, v.values["rate"], v.author]).to eq([2, "250", "ops"])
      expect { @client.update_config(component_id: "sq", values: { "rate" => "2500" }, merge: true) }
        .to raise_error(Flowctl::InvalidArgument, /config key "rate": 2500 is above the maximum 1000/)
      expect { @client.update_config(component_id: "sq", values: { "network" => "devnet" }, merge: true) }
        .to raise_error(Flowctl::InvalidArgument, /config key "network": "devnet" is not a JSON value/)
      acks["sq"] = "2"
      expect(@client.get_config(component_id: "sq").to_h.values_at(:version, :acknowledged_version)).to eq([2, 2])
      expect(@client.get_config(component_id: "sq", version: 1).values["rate"]).to eq("10")
      expect { @client.get_config(component_id: "sq", version: 7) }.to raise_error(Flowctl::NotFound)
      expect(@client.rollback_config(component_id: "sq", version: 1).version).to eq(3)
      expect(@client.config_history(component_id: "sq").versions.map(&:version)).to eq([1, 2, 3])
      expect(@client.get_config(component_id: "nobody").version).to eq(0)
    end

    it "streams the current version, then each new one (in process)" do
      got = Queue.new
      t = Thread.new { service.watch_config(Flowctl::Ext::V1::WatchConfigRequest.new(component_id: "p")) { |v| got << v } }
      service.store.update("p", { "a" => 1 })
      expect(got.pop.version).to eq(1)
      service.store.update("p", { "a" => 2 })
      expect(got.pop.values).to eq("a" => "2")
      service.stop
      expect(t.join(time_limit(3))).to be_truthy
    end
  end
end
