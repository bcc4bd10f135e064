# frozen_string_literal: true

require "spec_helper"
require "tmpdir"
require "open3"
require "rbconfig"
require "sqlite3" # Debian ruby-sqlite3 (script/setup)
require "json"
require "timeout"
require "flowctl/control_plane/persistence" # loaded by Registry.new(db:) only

# Registry.new(db: path): components survive a restart (and a SIGKILL) in SQLite.
RSpec.describe "Flowctl::ControlPlane::Registry persistence" do
  CPP = Flowctl::ControlPlane
  Reg = CPP::Registry

  around do |ex|
    Dir.mktmpdir("flowctl-db") do |dir|
      @dir = dir
      ex.run
    end
  end

  let(:path) { File.join(@dir, "cp.db") }

  def seed_register(registry, kind, id, **fields)
    cap = kind.to_s.capitalize
    registry.public_send(:"register_#{kind}", CPP.const_get(:"Register#{cap}Request").new("#{kind}_id": id, **fields))
  end

  def seed_beat(registry, kind, id, **fields)
    cap = kind.to_s.capitalize
    registry.public_send(:"#{kind}_heartbeat", CPP.const_get(:"#{cap}HeartbeatRequest").new("#{kind}_id": id, **fields))
  end

  it "knows every component after a restart, with its last status, metrics and times" do
    r = Reg.new(db: path, janitor_interval: nil)
    seed_register(r, :processor, "p1", endpoint: "10.0.0.1:9000", metadata: { "zone" => "a" })
    seed_register(r, :source, "s1")
    seed_beat(r, :processor, "p1", status: "DEGRADED", metrics: { "events" => 12.0, "lag" => Float::NAN })
    seed_register(r, :consumer, "gone")
    r.remove("gone")
    before = r.components
    r.close

    again = Reg.new(db: path, janitor_interval: nil)
    after = again.components
    expect(after.map(&:id)).to eq(%w[p1 s1])
    p1 = after.first
    expect([p1.kind, p1.protocol, p1.endpoint, p1.metadata, p1.status]).to eq([:processor, :seed, "10.0.0.1:9000", { "zone" => "a" }, "DEGRADED"])
    expect(p1.metrics["events"]).to eq(12.0)
    expect(p1.metrics["lag"]).to be_nan
    expect(p1.heartbeats).to eq(1)
    expect([p1.registered_at, p1.last_heartbeat]).to eq([before.first.registered_at, before.first.last_heartbeat])
    expect(seed_beat(again, :source, "s1", status: "HEALTHY").success).to be(true)
    again.close
  end

  it "keeps flowctl.v1 registrations by service_id, with their ComponentInfo, status and metrics" do
    v1 = Flowctl::V1
    r = Reg.new(db: path, janitor_interval: nil)
    info = { id: "info-id", name: "square", description: "squares", version: "1.0.0", type: :COMPONENT_TYPE_PROCESSOR,
             input_event_types: ["raw"], output_event_types: ["squared"], endpoint: "127.0.0.1:9001", metadata: { "a" => "b" } }
    r.register_component(v1::RegisterRequest.new(component: info, component_id: "service-id"))
    r.heartbeat(v1::HeartbeatRequest.new(service_id: "service-id", status: :HEALTH_STATUS_DEGRADED, metrics: { "n" => "7" }))
    r.close
    again = Reg.new(db: path, janitor_interval: nil)
    status = again.get_component_status(v1::ComponentStatusRequest.new(service_id: "service-id"))
    expect(status.component.to_h).to eq(info)
    expect([status.status, status.metrics]).to eq([:HEALTH_STATUS_DEGRADED, { "n" => "7" }])
    expect { again.get_component_status(v1::ComponentStatusRequest.new(service_id: "info-id")) }.to raise_error(Flowctl::NotFound)
    again.close
  end

  it "keeps ids, metadata and metrics with NUL, newlines, escapes and any Unicode exactly" do
    odd = "a\u0000b\nc\e[2J\u202Ed\u{1F600}"
    r = Reg.new(db: path, janitor_interval: nil)
    seed_register(r, :processor, odd, endpoint: odd, metadata: { odd => odd })
    seed_beat(r, :processor, odd, status: odd, metrics: { odd => Float::INFINITY, "neg" => -Float::INFINITY, "x" => 0.1 })
    r.close
    c = Reg.new(db: path, janitor_interval: nil).tap(&:close).component(odd)
    expect([c.id, c.endpoint, c.metadata, c.status]).to eq([odd, odd, { odd => odd }, odd])
    expect(c.metrics).to eq(odd => Float::INFINITY, "neg" => -Float::INFINITY, "x" => 0.1)
  end

  it "commits a registration before it is answered, and heartbeats within flush_interval" do
    r = Reg.new(db: path, janitor_interval: nil, flush_interval: 60)
    seed_register(r, :processor, "p1")
    db = SQLite3::Database.new(path)
    expect(db.execute("SELECT kind, protocol FROM components")).to eq([%w[processor seed]])
    seed_beat(r, :processor, "p1", status: "HEALTHY")
    record = -> { db.get_first_value("SELECT status FROM components") }
    expect(record.call).to eq("STARTING") # not yet: heartbeats are written every flush_interval
    r.close                                # ... and at close
    expect(record.call).to eq("HEALTHY")
    expect(db.get_first_value("PRAGMA user_version")).to eq(Reg::Persistence::MIGRATIONS.size)
  ensure
    db&.close
  end

  it "writes heartbeats every flush_interval" do
    r = Reg.new(db: path, janitor_interval: nil, flush_interval: 0.05)
    seed_register(r, :source, "s1")
    seed_beat(r, :source, "s1", status: "HEALTHY", metrics: { "n" => 1.0 })
    db = SQLite3::Database.new(path)
    deadline = Time.now + time_limit(5)
    status = nil
    while Time.now < deadline
      status = db.get_first_value("SELECT status FROM components")
      break if status == "HEALTHY"

      sleep 0.02
    end
    expect(status).to eq("HEALTHY")
  ensure
    db&.close
    r&.close
  end

  it "writes a heartbeat that changes only metrics once the stored one is older than refresh_interval" do
    clock = Struct.new(:now) { def call = now }.new(Time.at(1_700_000_000))
    r = Reg.new(db: path, janitor_interval: nil, flush_interval: 60, refresh_interval: 5, clock: clock)
    seed_register(r, :processor, "p1")
    seed_beat(r, :processor, "p1", status: "HEALTHY")
    pers = r.instance_variable_get(:@persistence)
    db = SQLite3::Database.new(path)
    stored = -> { db.get_first_row("SELECT status, metrics, heartbeats FROM components") }
    pers.flush
    expect(stored.call).to eq(["HEALTHY", "{}", 1])
    clock.now += 4
    seed_beat(r, :processor, "p1", status: "HEALTHY", metrics: { "n" => 1.0 }) # same status, 4 s later: not yet
    pers.flush
    expect(stored.call).to eq(["HEALTHY", "{}", 1])
    clock.now += 1
    seed_beat(r, :processor, "p1", metrics: { "n" => 2.0 }) # 5 s after the last write
    pers.flush
    expect(stored.call).to eq(["HEALTHY", '{"n":2.0}', 3])
    seed_beat(r, :processor, "p1", status: "DEGRADED") # a status change: at once
    pers.flush
    expect(stored.call).to eq(["DEGRADED", '{"n":2.0}', 4])
  ensure
    db&.close
    r&.close
  end

  it "adds later migrations to an existing file and keeps its components" do
    r = Reg.new(db: path, janitor_interval: nil)
    seed_register(r, :processor, "p1")
    r.close
    later = Reg::Persistence::MIGRATIONS + ["CREATE TABLE pipeline_runs (id TEXT PRIMARY KEY, started_at REAL);"]
    stub_const("Flowctl::ControlPlane::Registry::Persistence::MIGRATIONS", later)
    again = Reg.new(db: path, janitor_interval: nil)
    expect(again.components.map(&:id)).to eq(["p1"])
    again.persistence.transaction { |db| db.execute("INSERT INTO pipeline_runs VALUES ('r1', 1.5)") }
    expect(again.persistence.transaction { |db| db.get_first_value("SELECT count(*) FROM pipeline_runs") }).to eq(1)
    expect { again.persistence.transaction { |db| db.execute("INSERT INTO pipeline_runs VALUES ('r2', 2)"); raise "boom" } }
      .to raise_error(RuntimeError, "boom")
    expect(again.persistence.transaction { |db| db.get_first_value("SELECT count(*) FROM pipeline_runs") }).to eq(1)
    again.close
    db = SQLite3::Database.new(path)
    expect(db.get_first_value("PRAGMA user_version")).to eq(2)
    expect(db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").flatten).to eq(%w[components pipeline_runs])
  ensure
    db&.close
  end

  it "refuses a file whose schema is newer than it knows, and a file that is not a database" do
    Reg.new(db: path, janitor_interval: nil).close
    SQLite3::Database.new(path).tap { |db| db.execute("PRAGMA user_version = 99") }.close
    expect { Reg.new(db: path) }.to raise_error(Flowctl::Error, /schema version 99 is newer/)
    junk = File.join(@dir, "junk.db")
    File.write(junk, "not a database at all" * 100)
    expect { Reg.new(db: junk) }.to raise_error(Flowctl::Error, /junk\.db: cannot open the control plane database/)
  end

  it "answers UNAVAILABLE for a registration after close instead of waiting for a writer that is gone" do
    r = Reg.new(db: path, janitor_interval: nil)
    r.close
    Timeout.timeout(time_limit(5)) do
      expect { seed_register(r, :processor, "late") }.to raise_error(Flowctl::Unavailable, /control plane closed/)
    end
  end

  it "fails the registrations of a failed write with UNAVAILABLE, and takes the next ones once writes work again" do
    r = Reg.new(db: path, janitor_interval: nil)
    pers = r.persistence
    broken = true
    real = pers.method(:write)
    pers.define_singleton_method(:write) do |count, taken|
      raise SQLite3::IOException, "disk I/O error" if broken

      real.call(count, taken)
    end
    expect { expect { seed_register(r, :processor, "p1") }.to raise_error(Flowctl::Unavailable, /storage failed: disk I\/O error/) }
      .to output(/cannot write .*disk I\/O error/).to_stderr
    broken = false
    expect(seed_register(r, :processor, "p2").success).to be(true)
    r.close
    expect(Reg.new(db: path, janitor_interval: nil).tap(&:close).components.map(&:id).sort).to eq(%w[p1 p2]) # p1 written after all
  end

  it "refuses registrations in a forked child instead of waiting for the parent's writer thread" do
    r = Reg.new(db: path, janitor_interval: nil)
    rd, wr = IO.pipe
    pid = fork do
      rd.close
      begin
        seed_register(r, :processor, "child")
        wr.write("registered")
      rescue Flowctl::Unavailable => e
        wr.write(e.message)
      end
      exit!(0)
    end
    wr.close
    Timeout.timeout(time_limit(10)) { Process.wait(pid) }
    expect(rd.read).to match(/belongs to process #{Process.pid}: open the db again after fork/)
    expect(seed_register(r, :processor, "parent").success).to be(true)
  ensure
    r&.close
  end

  it "names the Debian package when the sqlite3 gem is missing" do
    allow(Reg::Persistence).to receive(:require).with("sqlite3").and_raise(LoadError, "cannot load such file -- sqlite3")
    expect { Reg::Persistence.load_sqlite }.to raise_error(Flowctl::Error, /apt-get install ruby-sqlite3/)
  end

  it "restarts consistent after a SIGKILL in the middle of writes, with every acknowledged registration" do
    child = <<~RUBY
      $stdout.sync = true
      require "flowctl"
      cp = Flowctl::ControlPlane
      r = cp::Registry.new(db: ARGV[0], janitor_interval: nil, flush_interval: 0.001)
      i = 0
      loop do
        id = "c\#{i}"
        r.register_processor(cp::RegisterProcessorRequest.new(processor_id: id, endpoint: "h:\#{i}", metadata: { "n" => i.to_s }))
        puts id # acknowledged: on disk
        20.times { |j| r.processor_heartbeat(cp::ProcessorHeartbeatRequest.new(processor_id: "c\#{j * 7 % (i + 1)}", status: "HEALTHY", metrics: { "m" => j.to_f })) }
        i += 1
      end
    RUBY
    3.times do |round|
      acked = []
      Open3.popen2(RbConfig.ruby, "-I#{FLOWCTL_LIB}", "-e", child, path) do |_in, out, wait|
        want = 30 + round * 25
        deadline = Time.now + time_limit(30)
        while acked.size < want && Time.now < deadline && (line = out.gets)
          acked << line.chomp
        end
        Process.kill("KILL", wait.pid)
        wait.value
      end
      expect(acked.size).to be >= 30
      db = SQLite3::Database.new(path)
      expect(db.get_first_value("PRAGMA integrity_check")).to eq("ok")
      db.close
      r = Reg.new(db: path, janitor_interval: nil)
      ids = r.components.map(&:id)
      expect(ids).to include(*acked)
      r.components.each { |c| expect(c.endpoint).to eq("h:#{c.id.delete_prefix('c')}") }
      r.close
    end
  end
end
