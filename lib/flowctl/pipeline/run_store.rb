# frozen_string_literal: true

require "json"
require "securerandom"
require_relative "../sqlite_retry"

module Flowctl
  module Pipeline
    # Where pipeline runs are recorded: id, name, definition (the YAML text), status
    # (STARTING, RUNNING, COMPLETED, FAILED, STOPPED), start and end, per-component counts
    # and the error. Two stores with one interface: RunStore::Memory and RunStore::SQLite
    # (a file shared with the control plane's own tables: one table, pipeline_runs).
    #
    #   store = Flowctl::Pipeline::RunStore.open("runs.db")   # nil: in memory
    #   run = store.create(name: "payments", definition: yaml)
    #   store.update(run.id, status: "RUNNING")
    #   store.list.first.status
    module RunStore
      STATUSES = %w[STARTING RUNNING COMPLETED FAILED STOPPED].freeze
      FINAL = %w[COMPLETED FAILED STOPPED].freeze

      # counts: {"component id" => {"in" => n, "out" => n, "failed" => n, "restarts" => n}}
      Run = Struct.new(:id, :name, :definition, :status, :started_at, :ended_at, :counts, :error, keyword_init: true) do
        def final? = FINAL.include?(status)

        def to_h
          super.merge(started_at: started_at&.utc&.iso8601(3), ended_at: ended_at&.utc&.iso8601(3))
        end
      end

      module_function

      # A store for path (SQLite), or in memory when path is nil.
      def open(path)
        path ? SQLite.new(path) : Memory.new
      end

      def new_id(now = Time.now)
        "run-#{now.utc.strftime('%Y%m%dT%H%M%S')}-#{SecureRandom.hex(3)}"
      end

      def check_status(status)
        return status if STATUSES.include?(status)

        raise ArgumentError, "status must be one of #{STATUSES.join(', ')} (given #{status.inspect})"
      end

      # What both stores share: argument checks and the update rules (a final status
      # keeps its end time; counts merge per component).
      module Common
        def create(name:, definition:, id: RunStore.new_id, started_at: Time.now)
          run = Run.new(id: id, name: name.to_s, definition: definition.to_s, status: "STARTING",
                        started_at: started_at, ended_at: nil, counts: {}, error: nil)
          insert(run)
          run
        end

        def update(id, status: nil, counts: nil, error: nil, ended_at: nil)
          run = get(id) or raise ArgumentError, "no pipeline run #{id.inspect}"
          if status
            run.status = RunStore.check_status(status)
            run.ended_at = ended_at || Time.now if run.final? && run.ended_at.nil?
          end
          run.counts = run.counts.merge(counts) if counts
          run.error = error.to_s if error
          replace(run)
          run
        end
      end

      # Runs in memory (gone when the process ends).
      class Memory
        include Common

        def initialize
          @runs = {}
          @lock = Mutex.new
        end

        def get(id) = @lock.synchronize { @runs[id]&.dup }

        # Newest first.
        def list(limit: 50)
          @lock.synchronize { @runs.values.sort_by(&:started_at).reverse.first(limit).map(&:dup) }
        end

        def close; end

        private

        def insert(run) = @lock.synchronize { @runs[run.id] = run.dup }
        def replace(run) = insert(run)
      end

      # Runs in an SQLite file (ruby-sqlite3), one row per run in table pipeline_runs.
      class SQLite
        include Common

        SCHEMA = <<~SQL
          CREATE TABLE IF NOT EXISTS pipeline_runs (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, definition TEXT NOT NULL, status TEXT NOT NULL,
            started_at REAL NOT NULL, ended_at REAL, counts TEXT NOT NULL DEFAULT '{}', error TEXT)
        SQL

        attr_reader :path

        def initialize(path)
          require "sqlite3"
          @path = File.expand_path(path)
          dir = File.dirname(@path)
          Dir.mkdir(dir, 0o700) unless File.directory?(dir)
          @lock = Mutex.new
          @db = ::SQLite3::Database.new(@path)
          @db.busy_timeout = 5000
          @db.execute(SCHEMA)
        rescue ::SQLite3::Exception => e
          raise Flowctl::Error, "run store #{path}: #{e.message}"
        end

        def get(id)
          row = sql("SELECT * FROM pipeline_runs WHERE id = ?", [id]).first
          row && from_row(row)
        end

        # Newest first.
        def list(limit: 50)
          sql("SELECT * FROM pipeline_runs ORDER BY started_at DESC LIMIT ?", [Integer(limit)]).map { |r| from_row(r) }
        end

        def close
          @lock.synchronize { @db.close unless @db.closed? }
        end

        private

        def insert(run)
          sql("INSERT INTO pipeline_runs (id, name, definition, status, started_at, ended_at, counts, error) " \
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", to_row(run))
        end

        def replace(run)
          row = to_row(run)
          sql("UPDATE pipeline_runs SET name = ?, definition = ?, status = ?, started_at = ?, ended_at = ?, " \
              "counts = ?, error = ? WHERE id = ?", row[1..] + [row[0]])
        end

        def to_row(run)
          [run.id, run.name, run.definition, run.status, run.started_at.to_f, run.ended_at&.to_f,
           JSON.generate(run.counts), run.error]
        end

        def from_row(row)
          id, name, definition, status, started, ended, counts, error = row
          Run.new(id: id, name: name, definition: definition, status: status, started_at: Time.at(started),
                  ended_at: ended && Time.at(ended), counts: JSON.parse(counts), error: error)
        end

        # The file is shared with the control plane's own tables (SQLiteRetry).
        def sql(statement, binds)
          @lock.synchronize { SQLiteRetry.execute(@db, statement, binds) }
        rescue ::SQLite3::Exception => e
          raise Flowctl::Error, "run store #{@path}: #{e.class}: #{e.message}"
        end
      end
    end
  end
end
